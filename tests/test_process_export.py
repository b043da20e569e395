"""Process reward models on the export side: every head form, the step token, parity at the step tokens,
fp16, the manifest, and how items become token ids with their step positions."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from rmserve.bundle import Bundle, BundleError, load_bundle
from rmserve.errors import InvalidItem, ItemTooLong
from rmserve.formatting import Formatter
from rmserve.items import StepsItem, TextItem
from rmserve.models.lean import LAYER_NODE_BUDGET
from rmserve.steps import StepEncoder
from tests.support.tiny import PROCESS_FORMS, tiny_process_checkpoint

# Each form's rule, head and lean layer (tests/test_lean_graph.py: Llama's 16 nodes, Qwen2's 17).
FORMS = {
    "qwen2-tc2": ("positive_prob", "token_classification", 17),
    "llama-tc1": ("sigmoid", "token_classification", 16),
    "llama-lm": ("positive_prob", "lm_head", 16),
    "qwen2-prm": ("positive_prob", "qwen2_prm", 17),
}


def test_exporting_a_process_checkpoint_again_gives_the_same_version(
    process_bundles: dict[str, Path], tmp_path: Path
) -> None:
    from rmserve.models.export import export_bundle
    from rmserve.models.process_heads import StepExport
    from tests.support.tiny import STEP_TOKENS

    bundle = process_bundles["qwen2-tc2"]  # the form of docs/process.md's worked example
    step = StepExport(STEP_TOKENS["qwen2-tc2"], None)
    again = export_bundle(bundle.parent / "checkpoint", tmp_path / "again", name="again", step=step)
    assert again.version == load_bundle(bundle).manifest.version


@pytest.mark.parametrize("form", PROCESS_FORMS)
def test_each_process_head_form_exports_the_lean_graph_of_step_values_within_the_layer_node_budget(
    form: str, process_bundles: dict[str, Path]
) -> None:
    manifest = load_bundle(process_bundles[form]).manifest
    assert manifest.kind == "process" and manifest.format.pooling == "step"
    assert manifest.process is not None
    rule, head, layer_nodes = FORMS[form]
    assert (manifest.process.rule, manifest.process.head) == (rule, head)
    # The lean graph by default, as for outcome decoders of these families: right padding only.
    assert (manifest.graph, manifest.graph_reason, manifest.padding) == ("lean", None, "right")
    parity = manifest.parity
    assert parity["values"].startswith("step values at") and not parity["left_padding_invariant"]
    assert parity["max_rel_diff"] <= 1e-4 and parity["batch_invariance_max"] <= 1e-5
    assert parity["padding_sides"] == ["right"] and parity["batch_sizes"] == [1, 7, 32]
    graph = onnx.load(str(process_bundles[form] / "model.onnx")).graph
    assert [d.dim_param for d in graph.output[0].type.tensor_type.shape.dim] == ["batch", "sequence"]
    scopes = Counter(node.name.split("/", 1)[0] for node in graph.node)
    assert {scopes["layer0"], scopes["layer1"]} == {layer_nodes}
    assert layer_nodes <= LAYER_NODE_BUDGET[manifest.model_type]
    assert manifest.exporter["lean"]["nodes_per_layer"] == layer_nodes  # type: ignore[attr-defined]
    ops = Counter(node.op_type for node in graph.node)
    assert ops["Attention"] == 2 and not {"Softmax", "Transpose", "Where"} & set(ops)
    # Nothing of vocabulary size but the input embedding: an LM head keeps only its two label rows.
    vocab = json.loads((process_bundles[form].parent / "checkpoint" / "config.json").read_text())[
        "vocab_size"
    ]
    assert sum(1 for t in graph.initializer if vocab in t.dims) == 1


def test_a_qwen2_prm_checkpoint_loads_without_remote_code_and_scores_as_its_head_defines(
    tmp_path: Path,
) -> None:
    import torch
    from safetensors import safe_open
    from transformers import Qwen2Model

    from rmserve.models.process_load import load_step_model

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


@pytest.mark.parametrize("graph", ["auto", "traced"])
def test_an_fp16_process_bundle_takes_fp16_by_headroom_and_records_its_step_value_drift(
    graph: str, process_bundles: dict[str, Path], tmp_path: Path
) -> None:
    from rmserve.models.export import export_bundle
    from rmserve.models.process_heads import StepExport

    checkpoint = process_bundles["llama-tc1"].parent / "checkpoint"
    step = StepExport(rule="sigmoid")
    manifest = export_bundle(
        checkpoint, tmp_path / "fp16", precision="fp16", max_length=64, step=step, graph=graph
    )
    assert manifest.precision == "fp16" and manifest.kind == "process"
    drift = manifest.parity["fp16"]
    assert drift["n_texts"] == 32 and 0 < drift["max_abs_diff"] < 0.05  # step values are probabilities
    assert drift["pairwise_ranking_agreement"] >= 0.98
    assert drift["headroom"]["fits_fp16"]  # a tiny model's residual stream is small
    if graph == "auto":  # the lean graph, rebuilt in fp16 throughout: every layer and the head
        assert manifest.graph == "lean" and not drift["residual_guard"]
        model = onnx.load(str(tmp_path / "fp16" / "model.onnx"))
        types = {t.data_type for t in model.graph.initializer if t.dims and len(t.dims) == 2}
        assert types == {onnx.TensorProto.FLOAT16}
    else:  # traced: the guarded converter, and parity on both paddings (the graph reads the mask)
        assert manifest.graph == "traced" and drift["residual_guard"]
        assert manifest.padding == "any" and manifest.parity["padding_sides"] == ["right", "left"]
        assert manifest.parity["max_rel_diff"] <= 1e-4


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


@pytest.mark.parametrize("rule", ["positive_prob", "prob_diff", "sigmoid", "raw"])
def test_the_lean_step_head_applies_every_rule_as_pytorch_does_on_right_padded_batches(
    rule: str, process_bundles: dict[str, Path], tmp_path: Path
) -> None:
    from rmserve.engines.batches import pad_rows
    from rmserve.engines.onnxruntime import OnnxRuntimeEngine
    from rmserve.models.lean import write_lean_graph
    from rmserve.models.parity import torch_scores
    from rmserve.models.process_load import load_step_model
    from tests.support.process import SOLUTIONS, encoded

    bundle = process_bundles["qwen2-tc2"]
    model, _, _, _ = load_step_model(bundle.parent / "checkpoint", rule=rule)  # type: ignore[arg-type]
    write_lean_graph(model, 256, tmp_path, precision="fp32", external_data_bytes=1 << 30)
    rows = encoded(bundle, list(SOLUTIONS))
    assert len({len(r) for r in rows}) == len(rows)  # every row but the longest is padded
    batch = pad_rows(rows, load_bundle(bundle).manifest.format.pad_token_id, "right")
    engine = OnnxRuntimeEngine(tmp_path / "model.onnx")
    try:
        got = engine.infer(batch)
    finally:
        engine.close()
    expected = torch_scores(model, batch)
    assert got.shape == expected.shape == batch.shape
    for i, row in enumerate(rows):  # the values read: each item's step tokens
        np.testing.assert_allclose(got[i, list(row.positions)], expected[i, list(row.positions)], atol=1e-5)
