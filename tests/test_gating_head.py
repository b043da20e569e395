"""ArmoRM's gating head (``LlamaForRewardModelWithGating``), served as its published remote code scores it.

The reference is RLHFlow/ArmoRM-Llama3-8B-v0.1's ``modeling_custom.py`` (tests/replicas/armorm/), run
as the model card runs it: ``model(tokenizer.apply_chat_template(messages, return_tensors="pt"))``, then
``output.score`` and ``output.rewards`` (the 19 objectives). The file imports
``LLAMA_INPUTS_DOCSTRING`` from transformers' Llama module, which transformers 5.25 no longer has (it
only decorates ``forward``'s docstring), so its definitions are executed from the file's own source
with that name set to an empty string. The replica's tokenizer gives the ids the file hard-codes for the
gate pattern (Llama-3's), and its config carries ArmoRM's fields (``num_objectives``, gating settings,
``auto_map``, the added ``[PAD]``, id 128256).
"""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rmserve.bundle import load_bundle, read_manifest
from rmserve.client import RewardClient
from rmserve.engines.gate import calibration_items
from rmserve.errors import InvalidItem
from rmserve.formatting import Formatter
from rmserve.items import ChatItem, Message, PairItem
from rmserve.models.export import ExportError, export_bundle
from tests.support.redis import delete_prefix, shared_redis_url, unique_prefix
from tests.support.replicas import (
    CONVERSATIONS,
    LLAMA3_VOCAB,
    REPLICAS,
    llama3_tokenizer,
    llama_config,
    published_definitions,
)
from tests.support.server import serve

OBJECTIVES = 19
PUBLISHED = "armorm/modeling_custom.py"


def armorm_class() -> Any:
    from transformers import LlamaModel, LlamaPreTrainedModel
    from transformers.utils import ModelOutput, add_start_docstrings_to_model_forward

    namespace: dict[str, Any] = {
        "dataclass": dataclass,
        "Optional": Optional,
        "List": list,  # the published file's typing names; builtins subscript the same way
        "Tuple": tuple,
        "torch": torch,
        "nn": nn,
        "F": F,
        "LlamaModel": LlamaModel,
        "LlamaPreTrainedModel": LlamaPreTrainedModel,
        "ModelOutput": ModelOutput,
        "add_start_docstrings_to_model_forward": add_start_docstrings_to_model_forward,
        "LLAMA_INPUTS_DOCSTRING": "",
    }
    names = ["GatingNetwork", "token_pattern", "find_token_for_gating", "CustomOutput"]
    names.append("LlamaForRewardModelWithGating")
    return published_definitions(PUBLISHED, names, namespace)["LlamaForRewardModelWithGating"]


def armorm_checkpoint(directory: Path, seed: int = 0) -> Path:
    tokenizer = llama3_tokenizer(llama3_ids=True, pad="[PAD]")
    config = llama_config(
        tokenizer,
        vocab_size=LLAMA3_VOCAB + 1,  # the added [PAD] row
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
        num_objectives=OBJECTIVES,
        gating_temperature=10,
        gating_hidden_dim=24,
        gating_n_hidden=3,
    )
    torch.manual_seed(seed)
    model = armorm_class()(config)
    with torch.no_grad():  # a transform and a scale that are not the identity and 1, so both are tested
        model.reward_transform_matrix.copy_(torch.eye(OBJECTIVES) + 0.3 * torch.randn(OBJECTIVES, OBJECTIVES))
        model.gating.logit_scale.fill_(1.7)
        model.regression_layer.weight.normal_(std=0.5)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    saved = json.loads((directory / "config.json").read_text())
    saved["auto_map"] = {
        "AutoModelForSequenceClassification": "modeling_custom.LlamaForRewardModelWithGating"
    }
    (directory / "config.json").write_text(json.dumps(saved, indent=2))
    shutil.copyfile(REPLICAS / PUBLISHED, directory / "modeling_custom.py")
    return directory


def card_outputs(checkpoint: Path) -> tuple[list[list[int]], list[float], list[list[float]]]:
    from transformers import AutoTokenizer

    model = armorm_class().from_pretrained(checkpoint, torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, use_fast=True)
    ids, scores, rewards = [], [], []
    for messages in CONVERSATIONS:
        out = tokenizer.apply_chat_template(messages, return_tensors="pt")
        input_ids = out["input_ids"] if not isinstance(out, torch.Tensor) else out
        with torch.no_grad():
            output = model(input_ids)
        ids.append(input_ids[0].tolist())
        scores.append(output.score.float()[0].item())
        rewards.append(output.rewards.float()[0].tolist())
    return ids, scores, rewards


@pytest.fixture(scope="module")
def armorm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("armorm")
    checkpoint = armorm_checkpoint(root / "checkpoint")
    # Its config.json names remote code (auto_map): export asks for the flag, though rmserve reads the head
    # from the weights and runs none of it.
    export_bundle(checkpoint, root / "bundle", name="armorm", max_length=256, trust_remote_code=True)
    return root


def test_armorm_serves_the_published_score_from_the_prompt_end_and_the_last_token(
    armorm: Path, tmp_path: Path
) -> None:
    manifest = read_manifest(armorm / "bundle")
    assert manifest.architecture == "LlamaForRewardModelWithGating" and manifest.graph == "lean"
    assert manifest.head is not None and manifest.head["form"] == "gating"
    assert manifest.head["gate_pattern"] == [128009, 128006, 78191, 128007, 271]
    assert manifest.head["components"] == [f"objective_{k}" for k in range(OBJECTIVES)]
    card_ids, card_scores, _ = card_outputs(armorm / "checkpoint")
    items = [ChatItem(tuple(Message(m["role"], m["content"]) for m in c)) for c in CONVERSATIONS]
    assert [list(e.ids) for e in Formatter(load_bundle(armorm / "bundle")).encode(items)] == card_ids
    # fp32: the card's scores exactly (on a CPU with bf16 units ``auto`` serves gated bf16).
    env = {"RMSERVE_MODELS": str(armorm / "bundle"), "RMSERVE_CACHE": "off", "RMSERVE_PRECISION": "fp32"}
    with serve(env, tmp_path) as server:
        scores = RewardClient(server.url).score(CONVERSATIONS)
        refused = httpx.post(
            server.url + "/v1/score",
            json={"items": [{"messages": CONVERSATIONS[0]}, {"text": "no turns here"}]},
            timeout=60,
        )
    assert scores == pytest.approx(card_scores, abs=1e-4)
    assert refused.status_code == 422 and "items[1]" in refused.text and "prompt end" in refused.text


def test_the_quality_gate_leaves_out_calibration_pairs_the_gating_head_refuses_as_requests(
    armorm: Path,
) -> None:
    bundle = load_bundle(armorm / "bundle")
    formatter = Formatter(bundle)
    rows = [json.loads(line) for line in (bundle.path / "calibration.jsonl").read_text().splitlines()]
    refused = 0
    for row in rows:
        try:
            formatter.encode([PairItem(row["prompt"], row["response"])])
        except InvalidItem:
            refused += 1
    # The export's calibration pairs include ones whose prompt end truncation cuts off at this
    # max_length: a request like them gets a 422, so the gate (which failed start-up on them) skips them.
    assert refused > 0
    items = calibration_items(bundle, formatter)
    pattern = list(bundle.manifest.format.gate_pattern or ())
    assert len(items) == len(rows) - refused
    assert all(any(list(e.ids[j : j + len(pattern)]) == pattern for j in range(len(e.ids))) for e in items)


def test_the_graphs_components_are_the_published_per_objective_rewards(armorm: Path) -> None:
    card_ids, card_scores, card_rewards = card_outputs(armorm / "checkpoint")
    session = ort.InferenceSession(str(armorm / "bundle" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["scores", "components"]
    width = max(len(i) for i in card_ids)  # right-padded, as the server pads
    ids = np.array([i + [128256] * (width - len(i)) for i in card_ids], dtype=np.int64)
    mask = np.array([[1] * len(i) + [0] * (width - len(i)) for i in card_ids], dtype=np.int64)
    scores, components = session.run(None, {"input_ids": ids, "attention_mask": mask})
    assert components.shape == (len(card_ids), OBJECTIVES)
    np.testing.assert_allclose(components, np.array(card_rewards), atol=1e-4)
    np.testing.assert_allclose(scores, np.array(card_scores), atol=1e-4)


def served_components(url: str, expected_hits: int) -> dict[str, list[float]]:
    """``/v1/score``'s components for the conversations, asserting how many items the cache answered."""
    reply = httpx.post(
        url + "/v1/score", json={"items": [{"messages": c} for c in CONVERSATIONS]}, timeout=120
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["usage"]["cache_hits"] == expected_hits
    components: dict[str, list[float]] = body["components"]
    return components


def assert_published(components: dict[str, list[float]], card_rewards: list[list[float]]) -> None:
    names = [f"objective_{k}" for k in range(OBJECTIVES)]
    assert list(components) == names
    served = np.array([components[name] for name in names]).T  # [items, objectives]
    np.testing.assert_allclose(served, np.array(card_rewards), atol=1e-4)


PINNED = {"RMSERVE_PROVIDER": "cpu", "RMSERVE_PRECISION": "fp32"}  # cache keys name both


def test_armorm_answers_the_published_per_objective_rewards_as_components_also_from_its_cache(
    armorm: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    _, card_scores, card_rewards = card_outputs(armorm / "checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(armorm / "checkpoint")
    queries = [tokenizer.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS]
    with serve({**PINNED, "RMSERVE_MODELS": f"armorm={armorm / 'bundle'}"}, tmp_path) as server:
        first = served_components(server.url, expected_hits=0)
        again = served_components(server.url, expected_hits=len(CONVERSATIONS))
        reward = httpx.post(server.url + "/get_reward", json={"query": queries}, timeout=120).json()
        models = httpx.get(server.url + "/v1/models", timeout=30).json()["data"]
    assert_published(first, card_rewards)
    assert again == first
    assert reward["rewards"] == pytest.approx(card_scores, abs=1e-4)
    assert_published(
        {k: v for k, v in reward["extra_logs"].items() if k.startswith("objective_")}, card_rewards
    )
    assert models[0]["components"] == [f"objective_{k}" for k in range(OBJECTIVES)]


def test_a_replica_sharing_redis_answers_armorm_components_from_the_cache(
    armorm: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import redis

    url, how = shared_redis_url(tmp_path_factory.mktemp("redis"))
    if url is None:
        pytest.skip(how)
    _, _, card_rewards = card_outputs(armorm / "checkpoint")
    prefix = unique_prefix()
    env = {**PINNED, "RMSERVE_MODELS": str(armorm / "bundle"), "RMSERVE_REDIS_URL": url}
    env["RMSERVE_CACHE_PREFIX"] = prefix
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        with serve(env, tmp_path_factory.mktemp("writer")) as writer:
            first = served_components(writer.url, expected_hits=0)
            for _ in range(100):  # the write-back is off the request path
                if len(list(client.scan_iter(match=prefix + "*"))) >= len(CONVERSATIONS):
                    break
                threading.Event().wait(0.1)
        with serve(env, tmp_path_factory.mktemp("reader")) as reader:  # nothing of the first in memory
            hit = served_components(reader.url, expected_hits=len(CONVERSATIONS))
    finally:
        client.close()
        delete_prefix(url, prefix)
    assert_published(first, card_rewards)
    assert_published(hit, card_rewards)


def test_a_gating_checkpoint_without_its_transform_matrix_fails_the_export_naming_it(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    checkpoint = armorm_checkpoint(tmp_path / "checkpoint")
    weights = load_file(str(checkpoint / "model.safetensors"))
    del weights["reward_transform_matrix"]
    save_file(weights, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ExportError, match="has no reward_transform_matrix"):
        export_bundle(checkpoint, tmp_path / "bundle", trust_remote_code=True)
    assert not (tmp_path / "bundle").exists()


def test_a_cache_entry_keeps_the_objectives_beside_the_score_and_one_score_entries_read_as_before() -> None:
    import struct

    from rmserve.cache.keys import Scored
    from rmserve.kinds import Objectives

    multi = Scored(Objectives(0.25, (1.5, -2.0, 3.0)), tokens=17, truncated=True)
    assert Scored.unpack(multi.pack()) == multi
    written_before = struct.pack(">dIB", -0.75, 12, 0)  # a one-score entry as the cache has always kept it
    assert Scored.unpack(written_before) == Scored(-0.75, 12, False)
    assert Scored(-0.75, 12, False).pack() == written_before


@pytest.mark.parametrize("provider", ["cpu", "openvino"])
def test_each_cpu_engine_returns_the_published_rewards_as_columns_after_the_score(
    armorm: Path, provider: str
) -> None:
    from rmserve.engines.base import pad_batch
    from rmserve.engines.select import Candidate, build

    bundle = load_bundle(armorm / "bundle")
    assert bundle.manifest.extra_outputs == ("components",)
    card_ids, card_scores, card_rewards = card_outputs(armorm / "checkpoint")
    engine = build(Candidate(provider, "fp32"), bundle, threads=2)
    try:
        rows = engine.infer(pad_batch(card_ids, bundle.manifest.format.pad_token_id))
    finally:
        engine.close()
    assert rows.shape == (len(card_ids), 1 + OBJECTIVES)
    np.testing.assert_allclose(rows[:, 0], np.array(card_scores), atol=1e-4)
    np.testing.assert_allclose(rows[:, 1:], np.array(card_rewards), atol=1e-4)
