"""An MLP ``score`` head (INF-ORM) and "logit k of the LM head" (Nemotron-Reward-HF), scored as the cards do.

- INF-ORM-Llama3.1-70B: the card defines ``INFORMForSequenceClassification`` (``score = Sequential(Linear,
  ReLU, Linear)``) and scores ``orm(tokenizer.apply_chat_template(conv, tokenize=True,
  return_tensors="pt")).logits[0][0]``. The class is vendored from allenai/reward-bench
  (rewardbench/models/inform.py), which ships the card's class, under tests/replicas/inf_orm/.
- Llama-3.1-Nemotron-70B-Reward-HF: the card loads ``AutoModelForCausalLM``, tokenizes with
  ``apply_chat_template(messages, tokenize=True, return_dict=True)`` and reads
  ``generate(max_new_tokens=1, return_dict_in_generate=True, output_scores=True)["scores"][0][0][0]``, the
  logit of token id 0 at the next position (NVIDIA's answer in the model's discussion #7: the reward
  head was copied into the output embedding's first row).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from rmserve.bundle import load_bundle, read_manifest
from rmserve.client import RewardClient
from rmserve.formatting import Formatter
from rmserve.items import ChatItem, Message
from rmserve.models.export import ExportError, export_bundle
from rmserve.models.named_heads import HeadRequest
from tests.support.replicas import CONVERSATIONS, llama3_tokenizer, llama_config, published_module
from tests.support.server import serve

# fp32: the reference's scores exactly (on a CPU with bf16 units ``auto`` serves gated bf16).
FP32 = {"RMSERVE_PRECISION": "fp32"}


def _ids(out: Any) -> torch.Tensor:
    # transformers 5 answers a BatchEncoding where 4.x answered the tensor the cards were written for.
    return out["input_ids"] if isinstance(out, Mapping) else out


def served_ids_and_scores(bundle: Path, tmp: Path) -> tuple[list[list[int]], list[float]]:
    """The token ids rmserve builds for CONVERSATIONS, and its scores for them over HTTP."""
    loaded = load_bundle(bundle)
    items = [ChatItem(tuple(Message(m["role"], m["content"]) for m in c)) for c in CONVERSATIONS]
    ids = [list(e.ids) for e in Formatter(loaded).encode(items)]
    with serve({"RMSERVE_MODELS": str(bundle), "RMSERVE_CACHE": "off", **FP32}, tmp) as server:
        scores = RewardClient(server.url).score(CONVERSATIONS)
    return ids, scores


def inform_checkpoint(directory: Path, seed: int = 0) -> Path:
    inform = published_module("inf_orm/inform.py")
    tokenizer = llama3_tokenizer()
    config = llama_config(tokenizer, num_labels=1)
    torch.manual_seed(seed)
    model = inform.INFORMForSequenceClassification(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_an_inf_orm_mlp_score_head_serves_the_cards_scores_on_the_lean_graph(tmp_path: Path) -> None:
    checkpoint = inform_checkpoint(tmp_path / "checkpoint")
    assert json.loads((checkpoint / "config.json").read_text())["architectures"] == [
        "INFORMForSequenceClassification"
    ]
    # A local directory is not named INF-ORM, so the family is named (a hub snapshot's path is).
    export_bundle(checkpoint, tmp_path / "bundle", max_length=256, family="inf-orm")
    manifest = read_manifest(tmp_path / "bundle")
    assert manifest.head == {"form": "mlp_score", "weights": "score"} and manifest.graph == "lean"

    from transformers import PreTrainedTokenizerFast

    inform = published_module("inf_orm/inform.py")
    orm = inform.INFORMForSequenceClassification.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(checkpoint)
    card_ids, card_scores = [], []
    for conv in CONVERSATIONS:
        ids = _ids(tokenizer.apply_chat_template(conv, tokenize=True, return_tensors="pt"))
        with torch.no_grad():
            card_scores.append(orm(ids).logits[0][0].item())
        card_ids.append(ids[0].tolist())
    ids, scores = served_ids_and_scores(tmp_path / "bundle", tmp_path)
    assert ids == card_ids
    assert scores == pytest.approx(card_scores, abs=1e-4)
    assert max(card_scores) - min(card_scores) > 1e-2  # the replica's scores differ, so order is tested


def nemotron_checkpoint(directory: Path, seed: int = 0) -> Path:
    from transformers import LlamaForCausalLM

    tokenizer = llama3_tokenizer()
    config = llama_config(tokenizer)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_the_nemotron_reward_hf_form_serves_the_logit_of_token_0_as_the_cards_generate_reads_it(
    tmp_path: Path,
) -> None:
    checkpoint = nemotron_checkpoint(tmp_path / "checkpoint")
    export_bundle(
        checkpoint,
        tmp_path / "bundle",
        max_length=256,
        head=HeadRequest(lm_logit=0),
        family="nemotron-reward-hf",
    )
    manifest = read_manifest(tmp_path / "bundle")
    assert manifest.architecture == "LlamaForCausalLM" and manifest.graph == "lean"
    assert manifest.head == {"form": "lm_logit", "weights": "lm_head", "token_id": 0}
    vocab = len(llama3_tokenizer())
    # One row of the LM head in the graph, never the vocabulary's: its largest tensor is the embedding.
    import onnx

    graph = onnx.load(str(tmp_path / "bundle" / "model.onnx"))
    shapes = [tuple(t.dims) for t in graph.graph.initializer]
    assert sum(1 for s in shapes if vocab in s) == 1

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    card_ids, card_scores = [], []
    for messages in CONVERSATIONS:
        tokenized = tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=False, return_tensors="pt", return_dict=True
        )
        out = model.generate(
            tokenized["input_ids"],
            attention_mask=tokenized["attention_mask"],
            max_new_tokens=1,
            return_dict_in_generate=True,
            output_scores=True,
        )
        card_scores.append(out["scores"][0][0][0].item())
        card_ids.append(tokenized["input_ids"][0].tolist())
    ids, scores = served_ids_and_scores(tmp_path / "bundle", tmp_path)
    assert ids == card_ids
    assert scores == pytest.approx(card_scores, abs=1e-4)


def test_lm_logit_outside_the_vocabulary_fails_naming_the_range(tmp_path: Path) -> None:
    checkpoint = nemotron_checkpoint(tmp_path / "checkpoint")
    with pytest.raises(ExportError, match=r"--lm-logit 100000 is not a token id of the LM head \(0 \.\. "):
        export_bundle(
            checkpoint, tmp_path / "bundle", head=HeadRequest(lm_logit=100000), family="nemotron-reward-hf"
        )
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize(
    ("architecture", "named"),
    [
        ("InternLM2ForRewardModel", "remote-code body"),
        ("Qwen2ForRewardModel", "modeling_qwen2_rm.py"),
    ],
)
def test_a_published_head_rmserve_does_not_compute_is_refused_by_name(
    tmp_path: Path, architecture: str, named: str
) -> None:
    checkpoint = inform_checkpoint(tmp_path / "checkpoint")
    config = json.loads((checkpoint / "config.json").read_text())
    config["architectures"] = [architecture]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=f"\\({architecture}\\) is not supported: .*{named}"):
        export_bundle(checkpoint, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
