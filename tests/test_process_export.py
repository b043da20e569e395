"""Process reward models on the export side: every head form, the step token, parity at the step tokens,
fp16, the manifest, and how items become token ids with their step positions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from rmserve.bundle import Bundle, BundleError, load_bundle
from rmserve.errors import InvalidItem, ItemTooLong
from rmserve.formatting import Formatter
from rmserve.items import StepsItem, TextItem
from rmserve.steps import StepEncoder
from tests.support.tiny import tiny_process_checkpoint

FORMS = ("qwen2-tc2", "llama-tc1", "llama-lm")


@pytest.mark.parametrize("form", FORMS)
def test_each_head_form_exports_a_graph_of_step_values_that_matches_pytorch_at_the_step_tokens(
    form: str, process_bundles: dict[str, Path]
) -> None:
    manifest = load_bundle(process_bundles[form]).manifest
    assert manifest.kind == "process" and manifest.format.pooling == "step"
    assert manifest.process is not None
    rule = {"qwen2-tc2": "positive_prob", "llama-tc1": "sigmoid", "llama-lm": "positive_prob"}[form]
    head = {"qwen2-tc2": "token_classification", "llama-tc1": "token_classification", "llama-lm": "lm_head"}
    assert (manifest.process.rule, manifest.process.head) == (rule, head[form])
    parity = manifest.parity
    assert parity["values"].startswith("step values at") and parity["left_padding_invariant"]
    assert parity["max_rel_diff"] <= 1e-4 and parity["batch_invariance_max"] <= 1e-5
    assert parity["padding_sides"] == ["right", "left"] and parity["batch_sizes"] == [1, 7, 32]
    graph = onnx.load(str(process_bundles[form] / "model.onnx")).graph
    assert len(graph.output[0].type.tensor_type.shape.dim) == 2  # [batch, length]
    # Nothing of vocabulary size but the input embedding: an LM head keeps only its two label rows.
    vocab = json.loads((process_bundles[form].parent / "checkpoint" / "config.json").read_text())[
        "vocab_size"
    ]
    assert sum(1 for t in graph.initializer if t.dims and t.dims[0] == vocab) == 1


def test_a_qwen2_prm_checkpoint_loads_without_remote_code_and_scores_as_its_head_defines(
    tmp_path: Path,
) -> None:
    import torch
    from safetensors import safe_open
    from transformers import Qwen2Model

    from rmserve.models.process_heads import load_step_model

    checkpoint = tiny_process_checkpoint("qwen2-prm", tmp_path / "checkpoint")
    model, tokenizer, meta, settings = load_step_model(checkpoint)
    assert (settings.head, settings.rule, meta.architecture) == (
        "qwen2_prm",
        "positive_prob",
        "Qwen2ForProcessRewardModel",
    )
    # The reference, written from the head's definition (Linear, ReLU, Linear; step reward = softmax[..., 1]).
    body = Qwen2Model.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager").eval()
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as fh:
        names = [k for k in fh.keys() if k.startswith("score.")]  # noqa: SIM118 (safe_open is no dict)
        w = {k: fh.get_tensor(k) for k in names}
    ids = torch.tensor([tokenizer.encode("The assistant explains the recipe for bread.<extra_0>ok<extra_0>")])
    with torch.no_grad():
        hidden = body(input_ids=ids).last_hidden_state
        inner = torch.relu(hidden @ w["score.0.weight"].T + w["score.0.bias"])
        expected = torch.softmax(inner @ w["score.2.weight"].T + w["score.2.bias"], dim=-1)[..., 1]
        got = model(ids, torch.ones_like(ids))
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_a_step_or_label_token_that_is_not_one_token_is_an_export_error_naming_it(
    process_bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rmserve.models.export_command import main

    checkpoint = process_bundles["qwen2-tc2"].parent / "checkpoint"
    assert main([str(checkpoint), str(tmp_path / "a"), "--step-token", "not one token"]) == 1
    out = capsys.readouterr().out
    assert "step token 'not one token' is not one token of the tokenizer" in out
    lm = process_bundles["llama-lm"].parent / "checkpoint"
    argv = [str(lm), str(tmp_path / "b"), "--step-token", "ки", "--label-tokens", "good", "-"]
    assert main(argv) == 1 and "label token 'good'" in capsys.readouterr().out
    assert main([str(checkpoint), str(tmp_path / "c"), "--step-rule", "raw"]) == 2
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_fp16_process_bundle_records_how_far_its_step_values_drift_from_fp32(
    process_bundles: dict[str, Path], tmp_path: Path
) -> None:
    from rmserve.models.export import export_bundle
    from rmserve.models.process_heads import StepExport

    checkpoint = process_bundles["llama-tc1"].parent / "checkpoint"
    manifest = export_bundle(
        checkpoint, tmp_path / "fp16", precision="fp16", max_length=64, step=StepExport(rule="sigmoid")
    )
    assert manifest.precision == "fp16" and manifest.kind == "process"
    drift = manifest.parity["fp16"]
    assert drift["n_texts"] == 32 and 0 < drift["max_abs_diff"] < 0.05  # step values are probabilities
    assert drift["pairwise_ranking_agreement"] >= 0.98


def test_a_process_bundle_whose_step_settings_were_edited_is_refused(
    process_bundles: dict[str, Path], tmp_path: Path
) -> None:
    bundle = shutil.copytree(process_bundles["qwen2-tc2"], tmp_path / "edited")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["process"]["rule"] = "raw"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="does not match"):
        load_bundle(bundle)


def _encoder(bundle_dir: Path, max_length: int) -> StepEncoder:
    bundle = load_bundle(bundle_dir)
    fmt = bundle.manifest.format.model_copy(update={"max_length": max_length})
    short = Bundle(bundle.path, bundle.manifest.model_copy(update={"format": fmt}))
    assert short.manifest.process is not None
    return StepEncoder(Formatter(short), short.manifest.process)


def test_the_step_encoder_cuts_the_oldest_tokens_before_the_first_step_then_whole_trailing_steps(
    process_bundles: dict[str, Path],
) -> None:
    full = _encoder(process_bundles["qwen2-tc2"], 4096)
    item = StepsItem("Please explain " * 6, ("Step one is here.", "Step two is here.", "Step three is here."))
    whole = full.encode([item])[0]
    step_id = full.settings.step_token_id
    assert [whole.ids[p] for p in whole.positions] == [step_id] * 3
    assert whole.positions[-1] == len(whole.ids) - 1  # nothing after the last step token is computed
    first = whole.positions[0]
    step_lengths = np.diff([first, *whole.positions[1:]]).tolist()  # tokens of steps 2 and 3

    # A limit the steps fit in: only tokens before the first step token go, oldest first, BOS kept.
    fit = _encoder(process_bundles["qwen2-tc2"], len(whole.ids) - 5).encode([item])[0]
    assert fit.truncated and fit.dropped == 0 and len(fit.ids) == len(whole.ids) - 5
    assert fit.ids[0] == whole.ids[0] and fit.ids[1:] == whole.ids[6:]
    # A limit that cannot hold every step: the leading steps that fit whole are kept.
    limit = 1 + 1 + step_lengths[0] + 1  # BOS, the first step token, step two, one token short of three
    cut = _encoder(process_bundles["qwen2-tc2"], limit).encode([item])[0]
    assert cut.dropped == 1 and len(cut.positions) == 2 and cut.ids[-1] == step_id
    assert cut.ids[1:] == whole.ids[first : whole.positions[1] + 1]
    with pytest.raises(ItemTooLong) as info:
        _encoder(process_bundles["qwen2-tc2"], limit).encode([item, item], strict=True, positions=[4, 7])
    assert info.value.index == 4 and info.value.limit == limit


def test_the_step_token_must_follow_each_step_and_appear_nowhere_else(
    process_bundles: dict[str, Path],
) -> None:
    enc = _encoder(process_bundles["qwen2-tc2"], 4096)
    with pytest.raises(InvalidItem, match="appears 3 times"):
        enc.encode([StepsItem("q", ("a <extra_0> b", "c"))])
    with pytest.raises(InvalidItem, match="appears nowhere"):
        enc.encode([TextItem("no step token")])
    texts = enc.encode([TextItem("a<extra_0>b<extra_0>c")])[0]
    assert len(texts.positions) == 2


def test_a_process_bundle_runs_at_its_own_precision_and_a_reduced_one_is_refused_with_the_reason(
    process_bundles: dict[str, Path],
) -> None:
    from rmserve.config import Settings
    from rmserve.engines.base import EngineError
    from rmserve.engines.select import candidates

    bundle = load_bundle(process_bundles["qwen2-tc2"])
    assert {c.precision for c in candidates(bundle, Settings(precision="auto"))} == {"fp32"}
    with pytest.raises(EngineError, match="a process bundle runs at its own precision"):
        candidates(bundle, Settings(precision="bf16"))
