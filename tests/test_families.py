"""Reward-model families scored as their authors score them: replicas of each stock-head family are exported
and served, and the served scores are compared with the family's published usage snippet run on the replica
(the snippets below follow the cards cited in tests/replicas/SOURCES.md; they are not rmserve code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rmserve.app import create_app
from rmserve.bundle import load_bundle
from rmserve.config import Settings
from rmserve.formatting import Formatter
from rmserve.items import ChatItem, Message
from rmserve.models.export import export_bundle
from rmserve.models.families.conversations import CONVERSATIONS, WEATHER_TOOL
from tests.replicas.build import replica
from tests.support.inproc import serve_app
from tests.support.server import wait_ready

pytestmark = pytest.mark.slow

CONV = [
    {"role": "user", "content": "How do I boil an egg? Réponds vite 🙂"},
    {"role": "assistant", "content": "Boil it for nine minutes, then cool it in cold water."},
]
# replica -> (family, BOS policy the reference implies, max_length the test exports at)
EXPECTED = {
    "skywork-v2-llama": ("skywork-reward-v2", None, 1024),
    "skywork-v2-qwen3": ("skywork-reward-v2", None, 1024),
    "skywork-v02-llama": ("skywork-reward", 1, 1024),
    "skywork-v02-gemma2": ("skywork-reward", 1, 1024),
    "grm-llama-ft": ("grm-ft", 2, 1024),
    "gemma3-1b-rm": ("gemma3-text", None, 1024),
    "oasst-deberta": ("openassistant-deberta", None, 512),
}

# replica -> the fixed conversations its authors' template refuses, and a phrase of the reason recorded.
# Gemma-2's template raises on a system turn, and on a tool result (roles must alternate), which the
# server gives the template as a user turn by its documented fallback.
NOT_COMPARED = {
    "skywork-v02-gemma2": {
        "system turn": "System role not supported",
        "tool call": "roles must alternate user/assistant/user/assistant/...; the server scores it by",
    },
    # Gemma-3's template takes a system turn into the first user turn, but raises on a tool result too.
    "gemma3-1b-rm": {
        "tool call": "roles must alternate user/assistant/user/assistant/...; the server scores it by",
    },
}


def skywork_v2_card(checkpoint: Path, conv: list[dict[str, Any]], tools: Any = None) -> float:
    """The Skywork-Reward-V2 card: render, strip a leading BOS, tokenize with the defaults (``tools``
    passed to the template as transformers takes them)."""
    rm = AutoModelForSequenceClassification.from_pretrained(checkpoint, dtype=torch.float32, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    formatted = tokenizer.apply_chat_template(conv, tools=tools, tokenize=False)
    if tokenizer.bos_token is not None and formatted.startswith(tokenizer.bos_token):
        formatted = formatted[len(tokenizer.bos_token) :]
    tokenized = tokenizer(formatted, return_tensors="pt")
    with torch.no_grad():
        return float(rm(**tokenized).logits[0][0].item())


def skywork_demo(checkpoint: Path, conv: list[dict[str, Any]]) -> float:
    """SkyworkAI/Skywork-Reward README "Demo Code": render, then the tokenizer's defaults (``eager``
    attention, the README's alternative to ``flash_attention_2``, which needs a GPU)."""
    rm = AutoModelForSequenceClassification.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager", num_labels=1
    )
    rm_tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    conv_formatted = rm_tokenizer.apply_chat_template(conv, tokenize=False)
    conv_tokenized = rm_tokenizer(conv_formatted, return_tensors="pt")
    with torch.no_grad():
        return float(rm(**conv_tokenized).logits[0][0].item())


def transformers_usage(checkpoint: Path, conv: list[dict[str, Any]]) -> float:
    """transformers' usage of a chat tokenizer, as TRL's RewardTrainer tokenizes a conversation:
    ``apply_chat_template(conv, tokenize=True)`` (the template's one ``<bos>``), ``logits[0][0]``."""
    rm = AutoModelForSequenceClassification.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager"
    )
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    inputs = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        return float(rm(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[0][0])


def grm_card(checkpoint: Path, conv: list[dict[str, Any]]) -> float:
    """The GRM -rewardmodel-ft card: render (BOS included), then encode_plus (a second BOS)."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, dtype=torch.float32)
    message_template = tokenizer.apply_chat_template(conv, tokenize=False)
    kwargs = {"padding": "longest", "truncation": True, "return_tensors": "pt"}
    # The card calls ``encode_plus``, which transformers 5 folded into ``__call__`` (same result).
    tokens = tokenizer(message_template, **kwargs)
    with torch.no_grad():
        reward_tensor = model(
            tokens["input_ids"][0].view(1, -1), attention_mask=tokens["attention_mask"][0].view(1, -1)
        )[0]
    return float(reward_tensor.cpu().detach().item())


def oasst_card(checkpoint: Path, conv: list[dict[str, Any]]) -> float:
    """OpenAssistant/reward-model-deberta-v3-large-v2: ``tokenizer(question, answer)``, ``logits[0]``."""
    rank_model = AutoModelForSequenceClassification.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    question, answer = conv[0]["content"], conv[1]["content"]
    inputs = tokenizer(question, answer, return_tensors="pt")
    with torch.no_grad():
        return float(rank_model(**inputs).logits[0].cpu().detach()[0])


CARDS = {
    "skywork-v2-llama": skywork_v2_card,
    "skywork-v2-qwen3": skywork_v2_card,
    "skywork-v02-llama": skywork_demo,
    "skywork-v02-gemma2": skywork_demo,
    "grm-llama-ft": grm_card,
    "gemma3-1b-rm": transformers_usage,
    "oasst-deberta": oasst_card,
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, Any]]:
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name, (_, _, length) in EXPECTED.items():
        checkpoint = replica(name, root / name)
        bundle = root / name / "bundle"
        manifest = export_bundle(checkpoint, bundle, name=name, max_length=length)
        out[name] = (checkpoint, bundle, manifest)
    return out


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_stock_head_family_exports_with_the_reference_tokens_and_scores_of_its_authors(
    exported: dict[str, tuple[Path, Path, Any]], name: str
) -> None:
    family, bos, _ = EXPECTED[name]
    manifest = exported[name][2]
    ref = manifest.parity["reference"]
    assert manifest.model_family["name"] == family == ref["name"]
    assert manifest.format.bos_tokens == bos
    assert ref["token_ids"] == "identical"
    assert ref["max_diff"] <= 1e-4
    # Every fixed conversation the authors' template renders was compared, the near-limit one included;
    # the others are listed with the template's own reason.
    refused = NOT_COMPARED.get(name, {})
    assert ref["conversations"] == [c.name for c in CONVERSATIONS if c.name not in refused]
    assert set(ref["not_compared"]) == set(refused)
    for conv, why in refused.items():
        assert why in ref["not_compared"][conv]
    assert max(ref["tokens"]) > manifest.format.max_length - 32
    # Only the Llama-3.2 template reads the date, so only its bundles pin one (the export's day).
    assert (manifest.format.template_date is not None) == (name != "skywork-v2-qwen3" and "llama" in name)


def test_a_pinned_template_date_is_what_the_reference_and_the_server_both_render(
    exported: dict[str, tuple[Path, Path, Any]], tmp_path: Path
) -> None:
    checkpoint = exported["skywork-v2-llama"][0]
    manifest = export_bundle(checkpoint, tmp_path / "b", max_length=512, template_date="2025-01-31")
    assert manifest.format.template_date == "2025-01-31"
    assert manifest.parity["reference"]["token_ids"] == "identical"
    formatter = Formatter(load_bundle(tmp_path / "b"))
    assert "Today Date: 31 Jan 2025" in formatter.text_of(0, ChatItem((Message("user", "hi"),)))


def test_a_plain_text_bundle_is_held_to_the_same_reference(
    exported: dict[str, tuple[Path, Path, Any]], tmp_path: Path
) -> None:
    checkpoint = exported["skywork-v02-llama"][0]
    manifest = export_bundle(checkpoint, tmp_path / "b", max_length=512, input_format="plain")
    assert manifest.format.bos_tokens == 1
    assert manifest.parity["reference"]["token_ids"] == "identical"


def test_the_server_answers_each_familys_card_score_and_shows_the_family_in_v1_models(
    exported: dict[str, tuple[Path, Path, Any]],
) -> None:
    models = ",".join(f"{name}={bundle}" for name, (_, bundle, _) in exported.items())
    settings = Settings(models=models, precision="fp32", provider="cpu", cache="off")
    with serve_app(create_app(settings)) as url:
        wait_ready(url)
        listed = {m["id"]: m for m in httpx.get(f"{url}/v1/models", timeout=60).json()["data"]}
        for name, (checkpoint, _, _) in exported.items():
            pair = {"prompt": CONV[0]["content"], "response": CONV[1]["content"]}
            item = pair if EXPECTED[name][0] == "openassistant-deberta" else {"messages": CONV}
            body = {"model": name, "items": [item]}
            served = httpx.post(f"{url}/v1/score", json=body, timeout=60).json()["scores"][0]
            card = CARDS[name](checkpoint, CONV)
            assert abs(served - card) <= 1e-4 * max(1.0, abs(card)), name
            assert listed[name]["family"]["name"] == EXPECTED[name][0]
            assert listed[name]["reference"]["token_ids"] == "identical"
        # Tools reach the template from the request, as they reach it in transformers.
        checkpoint = exported["skywork-v2-llama"][0]
        body = {"model": "skywork-v2-llama", "items": [{"messages": CONV, "tools": [WEATHER_TOOL]}]}
        with_tools = httpx.post(f"{url}/v1/score", json=body, timeout=60).json()["scores"][0]
        card = skywork_v2_card(checkpoint, CONV, [WEATHER_TOOL])
        assert abs(with_tools - card) <= 1e-4 * max(1.0, abs(card))
        assert abs(with_tools - skywork_v2_card(checkpoint, CONV)) > 1e-3
