"""Streamed export: weights flow checkpoint -> graph -> model.onnx.data one tensor at a time, and the
reference forward holds one layer at a time.

Tiny real checkpoints (tests/support/tiny.py), some saved in bfloat16 as real ones are; the export is
pushed onto its streaming path by ``external_data_bytes=0`` (every weight to model.onnx.data). The
memory this saves at real sizes is measured by ``python -m loadtests.export_memory`` (docs/export.md),
not here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from rmserve.bundle import MODEL_FILE, load_bundle
from rmserve.engines.batches import pad_rows
from rmserve.engines.onnxruntime import OnnxRuntimeEngine
from rmserve.formatting import Formatter
from rmserve.items import PairItem
from rmserve.models.export import export_bundle
from rmserve.models.heads import load_score_model
from rmserve.models.lean.source import SafetensorsSource
from rmserve.models.parity import builtin_pairs, spread_by_length
from rmserve.models.process_heads import StepExport
from rmserve.models.process_load import load_step_model
from tests.support.tiny import STEP_TOKENS, tiny_checkpoint, tiny_process_checkpoint


def bf16_checkpoint(arch: str, directory: Path) -> Path:
    """A tiny checkpoint of ``arch`` saved again in bfloat16."""
    from transformers import AutoModelForSequenceClassification

    checkpoint = tiny_checkpoint(arch, directory)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, dtype=torch.bfloat16)
    model.save_pretrained(checkpoint)
    return checkpoint


def items(n: int = 24) -> list[PairItem]:
    return [PairItem(p.prompt, p.response) for p in spread_by_length(builtin_pairs(), n)]


def served_scores(bundle: Path) -> np.ndarray:
    loaded = load_bundle(bundle)
    encoded = Formatter(loaded).encode(items())
    engine = OnnxRuntimeEngine(loaded.model_path)
    try:
        return engine.infer(pad_rows(encoded, loaded.manifest.format.pad_token_id, "right"))
    finally:
        engine.close()


@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "gemma3_text"])
def test_the_layer_by_layer_reference_scores_exactly_what_the_whole_float32_model_scores(
    arch: str, tmp_path: Path
) -> None:
    checkpoint = bf16_checkpoint(arch, tmp_path / arch)
    whole, _, _ = load_score_model(checkpoint)
    layerwise, _, _ = load_score_model(checkpoint, layerwise=True)
    # Between forwards the layers hold no weights: they are read for each forward and dropped after.
    assert {p.device.type for p in layerwise.body.layers.parameters()} == {"meta"}
    ids = torch.randint(3, 300, (4, 40))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    with torch.inference_mode():
        assert torch.equal(whole(ids, mask), layerwise(ids, mask))
    assert {p.device.type for p in layerwise.body.layers.parameters()} == {"meta"}


def process_checkpoint(form: str, directory: Path) -> Path:
    """A tiny process checkpoint of each head form the layer-by-layer path takes, saved in bfloat16:
    ``tests/support/tiny.py``'s forms, an LM head tied to its input embeddings (no ``lm_head.weight``),
    and Skywork-o1's value head (a Qwen2 body and ``v_head.summary.*``)."""
    from safetensors.torch import load_file, save_file

    checkpoint = tiny_process_checkpoint(FORMS[form][0], directory)
    config = json.loads((checkpoint / "config.json").read_text())
    weights = load_file(str(checkpoint / "model.safetensors"))
    if form == "llama-lm-tied":
        del weights["lm_head.weight"]
        config["tie_word_embeddings"] = True
    if form == "qwen2-value":
        weights = {k: v for k, v in weights.items() if not k.startswith("score.")}
        weights |= {
            "v_head.summary.weight": torch.randn(
                1, config["hidden_size"], generator=torch.Generator().manual_seed(0)
            ),
            "v_head.summary.bias": torch.ones(1),
        }
        config["architectures"] = ["Qwen2ForPrmModel"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    bf16 = {k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()}
    save_file(bf16, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    return checkpoint


# form -> (the tests/support/tiny.py form it starts from, the head form load_step_model finds)
FORMS = {
    "qwen2-tc2": ("qwen2-tc2", "token_classification"),
    "llama-tc1": ("llama-tc1", "token_classification"),
    "llama-lm": ("llama-lm", "lm_head"),
    "llama-lm-tied": ("llama-lm", "lm_head"),
    "qwen2-prm": ("qwen2-prm", "qwen2_prm"),
    "qwen2-value": ("qwen2-prm", "value_head"),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_the_layer_by_layer_process_reference_gives_exactly_the_whole_float32_models_step_values(
    form: str, tmp_path: Path
) -> None:
    checkpoint = process_checkpoint(form, tmp_path / form)
    base, head = FORMS[form]
    whole, _, _, settings = load_step_model(checkpoint, step_token=STEP_TOKENS[base])
    layerwise, _, _, _ = load_step_model(checkpoint, step_token=STEP_TOKENS[base], layerwise=True)
    assert settings.head == head
    assert {p.device.type for p in layerwise.body.layers.parameters()} == {"meta"}
    ids = torch.randint(3, 300, (4, 40))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    with torch.inference_mode():
        expected, got = whole(ids, mask), layerwise(ids, mask)
    assert expected.shape == (4, 40) and torch.equal(expected, got)
    assert {p.device.type for p in layerwise.body.layers.parameters()} == {"meta"}


def test_a_process_checkpoint_missing_a_body_weight_fails_the_layer_by_layer_load_naming_it(
    tmp_path: Path,
) -> None:
    from safetensors.torch import load_file, save_file

    checkpoint = process_checkpoint("qwen2-prm", tmp_path / "prm")
    weights = load_file(str(checkpoint / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks body weights: layers\.1\.mlp\.up_proj\.weight"):
        load_step_model(checkpoint, layerwise=True)


def test_a_streamed_process_export_runs_its_reference_layer_by_layer_and_holds_parity(tmp_path: Path) -> None:
    checkpoint = process_checkpoint("qwen2-prm", tmp_path / "checkpoint")
    step = StepExport(STEP_TOKENS["qwen2-prm"])
    manifest = export_bundle(checkpoint, tmp_path / "bundle", step=step, external_data_bytes=0)
    assert manifest.kind == "process" and manifest.graph == "lean"
    assert manifest.exporter["weights"] == "streamed from the checkpoint's safetensors"
    assert manifest.exporter["reference_forward"] == "float32, layer by layer"
    assert manifest.parity["max_rel_diff"] <= 1e-4


def test_the_safetensors_source_reads_each_tensor_in_its_stored_dtype(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    checkpoint = bf16_checkpoint("llama", tmp_path / "llama")
    source = SafetensorsSource(checkpoint)
    stored = load_file(str(checkpoint / "model.safetensors"))
    assert source.names() == frozenset(stored)
    for name, tensor in stored.items():
        read = source.tensor(name)
        assert read.dtype == tensor.dtype == torch.bfloat16 and torch.equal(read, tensor), name


def test_a_bf16_checkpoint_streams_straight_into_an_fp16_bundle_with_no_fp32_graph(tmp_path: Path) -> None:
    checkpoint = bf16_checkpoint("qwen2", tmp_path / "checkpoint")
    manifest = export_bundle(checkpoint, tmp_path / "fp16", precision="fp16", external_data_bytes=0)
    assert manifest.exporter["weights"] == "streamed from the checkpoint's safetensors"
    assert manifest.exporter["reference_forward"] == "float32, layer by layer"
    assert manifest.parity["fp32_graph"] == "not written: weights streamed straight to fp16"
    # No fp32 graph to run: the family's reference usage is held to the float32 reference forward.
    held = manifest.parity["reference"]
    assert held["scored_by"] == "the float32 reference forward (no fp32 graph is written)"
    assert held["token_ids"] == "identical" and held["max_diff"] <= 1e-4
    record = manifest.parity["fp16"]
    assert record["residual_guard"] is False and record["pairwise_ranking_agreement"] >= 0.98
    # Every weight is in model.onnx.data, in float16; model.onnx holds names, offsets and lengths.
    proto = onnx.load(str(tmp_path / "fp16" / MODEL_FILE), load_external_data=False)
    large = [t for t in proto.graph.initializer if np.prod(t.dims) >= 512]
    assert large and all(t.data_location == TensorProto.EXTERNAL and not t.raw_data for t in large)
    assert {t.data_type for t in large} == {TensorProto.FLOAT16}
    assert (tmp_path / "fp16" / MODEL_FILE).stat().st_size < 64 * 1024
    # The packed q/k/v weight of layer 0 is the checkpoint's bf16 weights converted to fp16 as torch does.
    full = onnx.load(str(tmp_path / "fp16" / MODEL_FILE))
    qkv = next(t for t in full.graph.initializer if t.name.startswith("layer0/qkv"))
    source = SafetensorsSource(checkpoint)
    parts = [source.tensor(f"model.layers.0.self_attn.{p}_proj.weight") for p in "qkv"]
    expected = torch.cat([w.to(torch.float16).T for w in parts], dim=1).numpy()
    np.testing.assert_array_equal(numpy_helper.to_array(qkv), expected)


def test_a_streamed_fp32_bundle_scores_what_the_bundle_built_in_memory_scores(tmp_path: Path) -> None:
    checkpoint = bf16_checkpoint("llama", tmp_path / "checkpoint")
    streamed = export_bundle(checkpoint, tmp_path / "streamed", external_data_bytes=0)
    in_memory = export_bundle(checkpoint, tmp_path / "in-memory")
    assert "model.onnx.data" in streamed.files and "model.onnx.data" not in in_memory.files
    assert streamed.parity["max_rel_diff"] <= 1e-4
    np.testing.assert_array_equal(served_scores(tmp_path / "streamed"), served_scores(tmp_path / "in-memory"))


@pytest.mark.parametrize("name", ["skywork-v02-gemma2", "skywork-v2-llama", "grm-llama-ft"])
def test_the_authors_usage_run_layer_by_layer_reads_the_same_ids_and_scores_as_their_whole_model(
    name: str, tmp_path: Path
) -> None:
    from rmserve.models.families.base import ReferenceSettings
    from rmserve.models.families.conversations import CONVERSATIONS
    from rmserve.models.loading import outcome_family
    from tests.replicas.build import replica

    checkpoint = replica(name, tmp_path)
    family = outcome_family(checkpoint, None, trust_remote_code=False)
    assert family.reference is not None
    runs = {
        layerwise: family.reference(
            checkpoint, CONVERSATIONS, ReferenceSettings(False, "2026-12-08", 1024, None, layerwise)
        )
        for layerwise in (False, True)
    }
    whole, layered = runs[False], runs[True]
    assert layered.ids == whole.ids and layered.rendered == whole.rendered
    assert layered.refused == whole.refused
    # The same modules on the same float32 weights; on two of the five conversations of the Llama-3.1
    # replicas the sums come out in another order (8e-7 relative at most, measured), so: within 1e-6.
    np.testing.assert_allclose(layered.scores, whole.scores, rtol=1e-6, atol=1e-7)
