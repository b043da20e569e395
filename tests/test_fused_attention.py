"""Fused attention in traced decoder bundles: one ONNX Attention op per layer, PyTorch's scores over HTTP.

Tiny random-init Llama, Qwen2 and Qwen3 reward models exported with ``--graph traced`` (the default
for them is the lean graph: tests/test_lean_graph.py); their scores through a real ``rmserve serve``
are held to the PyTorch model (eager attention, fp32) on left- and right-padded batches of the same
items. Also: the fp16 variant, and the unfused flag.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest

import rmserve.models.export as export_mod
from rmserve.bundle import MODEL_FILE, load_bundle
from rmserve.engines.batches import pad_rows
from rmserve.engines.onnxruntime import OnnxRuntimeEngine
from rmserve.formatting import Formatter
from rmserve.items import PairItem
from rmserve.models import export_command
from rmserve.models.data import HH_DEV_ENV
from rmserve.models.export import export_bundle
from rmserve.models.heads import load_score_model
from rmserve.models.parity import torch_scores
from tests.support.server import serve
from tests.support.tiny import tiny_bundle

FUSED_ARCHS = ("llama", "qwen2", "qwen3")
LAYERS = 2  # tests/support/tiny.py
ITEMS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("hi", "hello"),
    ("Explain gravity to a child " * 6, "Things fall down because the Earth pulls them."),
    ("Can you help me?", "No."),
    ("How do I bake bread?", "Mix flour, water, salt and yeast, knead, let it rise, then bake it hot."),
]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> its traced bundle (``checkpoint`` beside it)."""
    return {arch: tiny_bundle(arch, tmp_path_factory.mktemp(arch), graph="traced") for arch in FUSED_ARCHS}


def ops_of(bundle: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(bundle / MODEL_FILE), load_external_data=False).graph.node]


@pytest.mark.parametrize("arch", FUSED_ARCHS)
def test_a_decoder_exports_one_fused_attention_op_per_layer_and_no_softmax(
    arch: str, bundles: dict[str, Path]
) -> None:
    manifest = load_bundle(bundles[arch]).manifest
    ops = ops_of(bundles[arch])
    assert manifest.attention == "fused:Attention" and manifest.attention_reason is None
    assert (manifest.graph, manifest.graph_reason, manifest.padding) == ("traced", "--graph traced", "any")
    assert manifest.opset == 23
    assert ops.count("Attention") == LAYERS
    assert "Softmax" not in ops
    # RMSNorm and rotary embeddings come out as single ops too (Qwen3 adds a q and k norm per layer).
    norms = 2 * LAYERS + 1 + (2 * LAYERS if arch == "qwen3" else 0)
    assert ops.count("RMSNormalization") == norms
    assert ops.count("RotaryEmbedding") == 2 * LAYERS
    assert manifest.exporter["fused_ops"] == {  # type: ignore[attr-defined]
        "Attention": LAYERS,
        "RMSNormalization": norms,
        "RotaryEmbedding": 2 * LAYERS,
    }
    assert manifest.parity["max_rel_diff"] <= 1e-4 and manifest.parity["padding_sides"] == ["right", "left"]


def test_served_fused_scores_equal_pytorch_on_left_and_right_padded_batches(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    """One server holds all three models; its scores equal PyTorch's under either padding side."""
    models = ",".join(f"{arch}={bundles[arch]}" for arch in FUSED_ARCHS)
    env = {"RMSERVE_MODELS": models, "RMSERVE_PRECISION": "fp32", "RMSERVE_CACHE": "off"}
    with serve(env, tmp_path) as server:
        served = {}
        for arch in FUSED_ARCHS:
            items = [{"prompt": p, "response": r} for p, r in ITEMS]
            resp = httpx.post(server.url + "/v1/score", json={"model": arch, "items": items}, timeout=60)
            assert resp.status_code == 200, resp.text
            served[arch] = np.array(resp.json()["scores"])
    for arch in FUSED_ARCHS:
        bundle = load_bundle(bundles[arch])
        model, _, _ = load_score_model(bundles[arch].parent / "checkpoint")  # eager attention
        encoded = Formatter(bundle).encode([PairItem(p, r) for p, r in ITEMS])
        pad = bundle.manifest.format.pad_token_id
        engine = OnnxRuntimeEngine(bundle.model_path)
        try:
            for side in ("right", "left"):
                batch = pad_rows(encoded, pad, side)
                expected = torch_scores(model, batch)
                np.testing.assert_allclose(served[arch], expected, rtol=1e-4, atol=1e-4)
                np.testing.assert_allclose(engine.infer(batch), expected, rtol=1e-4, atol=1e-4)
        finally:
            engine.close()


def reuse_traced(monkeypatch: pytest.MonkeyPatch, source: Path) -> None:
    """Take ``source``'s traced graph instead of tracing again (tracing is covered above)."""

    def traced(model: object, meta: object, directory: Path, **_: object) -> str:
        shutil.copyfile(source / MODEL_FILE, directory / MODEL_FILE)
        return "reused"

    monkeypatch.setattr(export_mod, "export_onnx", traced)


def test_the_fp16_variant_keeps_the_fused_ops_and_passes_its_gate(
    bundles: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Llama: the tiny Qwen3 has two near-tied items whose order fp16 flips (fused or not, 0.998). The
    # built-in texts, whether or not the shared HH data is present: on HH dev the random tiny Llama has
    # near ties of its own (0.998, fused or not), which say nothing about the fused graph.
    monkeypatch.setenv(HH_DEV_ENV, str(tmp_path / "no-shared-data"))
    fp32 = bundles["llama"]
    reuse_traced(monkeypatch, fp32)
    manifest = export_bundle(fp32.parent / "checkpoint", tmp_path / "fp16", precision="fp16", graph="traced")
    assert manifest.precision == "fp16" and manifest.attention == "fused:Attention"
    fp16 = manifest.parity["fp16"]
    assert fp16["residual_guard"] is True  # a traced graph keeps the fp32 residual guard
    assert fp16["pairwise_ranking_agreement"] >= 0.999 and fp16["max_rel_diff"] < 0.05
    graph = onnx.load(str(tmp_path / "fp16" / MODEL_FILE)).graph
    assert [n.op_type for n in graph.node].count("Attention") == LAYERS
    types = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}
    attention_outputs = [n.output[0] for n in graph.node if n.op_type == "Attention"]
    assert all(types.get(o) == onnx.TensorProto.FLOAT16 for o in attention_outputs)


def test_no_fuse_attention_keeps_the_unfused_graph_and_says_why(
    bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = bundles["llama"].parent / "checkpoint"
    assert export_command.main([str(checkpoint), str(tmp_path / "unfused"), "--no-fuse-attention"]) == 0
    assert "attention unfused (--no-fuse-attention)" in capsys.readouterr().out
    manifest = load_bundle(tmp_path / "unfused").manifest
    assert manifest.attention == "unfused" and manifest.attention_reason == "--no-fuse-attention"
    assert (manifest.graph, manifest.graph_reason) == ("traced", "--no-fuse-attention")
    assert manifest.opset == 18 and manifest.parity["max_rel_diff"] <= 1e-4
    ops = ops_of(tmp_path / "unfused")
    assert "Attention" not in ops and ops.count("Softmax") == LAYERS


def test_a_graph_that_does_not_fuse_is_exported_unfused_with_the_reason(
    bundles: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check counts Attention ops per layer: a graph with too few is redone unfused."""
    calls: list[int] = []
    real: Callable[..., str] = export_mod.export_onnx

    def first_one_layer_short(model: object, meta: object, directory: Path, **kw: object) -> str:
        calls.append(int(kw["opset"]))  # type: ignore[call-overload]
        if len(calls) == 1:
            shutil.copyfile(bundles["llama"] / MODEL_FILE, directory / MODEL_FILE)
            proto = onnx.load(str(directory / MODEL_FILE))
            for node in proto.graph.node:
                if node.op_type == "Attention":
                    node.op_type = "Softmax"  # a stand-in for attention left in pieces
                    break
            onnx.save(proto, str(directory / MODEL_FILE))
            return "patched"
        return real(model, meta, directory, **kw)

    monkeypatch.setattr(export_mod, "export_onnx", first_one_layer_short)
    manifest = export_bundle(bundles["llama"].parent / "checkpoint", tmp_path / "b", graph="traced")
    assert calls == [23, 18]
    assert manifest.attention == "unfused"
    assert manifest.attention_reason is not None and "Softmax" in manifest.attention_reason
    assert manifest.parity["max_rel_diff"] <= 1e-4
