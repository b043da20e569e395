"""The lean decoder graph (models/lean): no padding mask, grouped K/V, a node budget per layer, right padding.

Tiny random-init Llama, Qwen2, Qwen3, Mistral, Gemma-2 and Gemma-3 reward models exported with the
default settings get the lean graph; its fp32 scores equal PyTorch's on right-padded mixed batches
(export parity, a real ``rmserve serve``, ONNX Runtime's CPU provider and OpenVINO); the served engine
refuses a left-padded batch; fp16 keeps the fp32 residual guard only where the measured headroom asks
for it; bf16 is built by the same builder and checked on OpenVINO (ONNX Runtime's CPU provider has no
bf16 kernels).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from rmserve.bundle import MODEL_FILE, load_bundle
from rmserve.config import Settings
from rmserve.engines.base import BatchRefused, EngineError
from rmserve.engines.batches import pad_rows
from rmserve.engines.onnxruntime import OnnxRuntimeEngine, bf16_problem
from rmserve.engines.openvino import OpenVinoEngine
from rmserve.engines.select import candidates, create_engine
from rmserve.formatting import Formatter
from rmserve.items import PairItem
from rmserve.models.export import ExportError, export_bundle
from rmserve.models.headroom import FP16_MAX, MARGIN
from rmserve.models.heads import load_score_model
from rmserve.models.lean import LAYER_NODE_BUDGET, why_not_lean
from rmserve.models.lean.eligibility import layer_windows
from rmserve.models.parity import builtin_pairs, spread_by_length, torch_scores
from rmserve.models.reduced import BF16_CUDA_OPS
from tests.support.server import serve
from tests.support.tiny import LEAN, tiny_bundle, tiny_checkpoint

LAYERS = 2  # tests/support/tiny.py
HEADS, KV_HEADS = 4, 2
# Nodes of one layer, exactly: Llama's 16, Qwen2's bias Add, Qwen3's reshape-norm-reshape for q and k,
# Gemma-2's two extra norms (GELU one node), Gemma-3's = Gemma-2's + Qwen3's q and k norms.
LAYER_NODES = {"llama": 16, "mistral": 16, "qwen2": 17, "qwen3": 22, "gemma2": 17, "gemma3_text": 23}


@pytest.fixture(scope="module")
def bundles(tiny_bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> its lean bundle: llama and qwen2 from the session's tiny bundles, the others here."""
    out = {arch: tiny_bundles[arch] for arch in ("llama", "qwen2")}
    for arch in ("qwen3", "mistral", "gemma2", "gemma3_text"):
        out[arch] = tiny_bundle(arch, tmp_path_factory.mktemp(arch))
    return out


def mixed_items(n: int = 32) -> list[PairItem]:
    """``n`` pairs from a few tokens to about a hundred: every batch of them is padded."""
    pairs = spread_by_length(builtin_pairs(), n - 2)
    items = [PairItem(p.prompt, p.response) for p in pairs]
    return items + [PairItem("hi", "yo"), PairItem("Tell me everything. " * 12, "Here it is. " * 10)]


def graph_of(bundle: Path) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(onnx.load(str(bundle / MODEL_FILE)))


@pytest.mark.parametrize("arch", LEAN)
def test_a_llama_layout_decoder_exports_the_lean_graph_within_its_node_budget(
    arch: str, bundles: dict[str, Path]
) -> None:
    manifest = load_bundle(bundles[arch]).manifest
    assert (manifest.graph, manifest.graph_reason, manifest.padding) == ("lean", None, "right")
    assert manifest.attention == "fused:Attention" and manifest.opset == 23
    assert manifest.parity["padding_sides"] == ["right"] and manifest.parity["batch_sizes"] == [1, 7, 32]
    assert manifest.parity["max_rel_diff"] <= 1e-4 and manifest.parity["batch_invariance_max"] <= 1e-5
    model = graph_of(bundles[arch])
    nodes = model.graph.node
    # Counted two ways: by each node's scope, and as what the layers leave of the whole graph.
    scopes = Counter(node.name.split("/", 1)[0] for node in nodes)
    per_layer = {scopes[f"layer{i}"] for i in range(LAYERS)}
    outside = sum(n for scope, n in scopes.items() if not scope.startswith("layer"))
    assert per_layer == {LAYER_NODES[arch]} == {(len(nodes) - outside) // LAYERS}
    assert LAYER_NODES[arch] <= LAYER_NODE_BUDGET[arch] <= (24 if arch in ("qwen3", "gemma3_text") else 20)
    assert manifest.exporter["lean"]["nodes_per_layer"] == LAYER_NODES[arch]  # type: ignore[attr-defined]
    ops = Counter(node.op_type for node in nodes)
    assert ops["Attention"] == ops["RotaryEmbedding"] // 2 == LAYERS
    assert not {"Softmax", "Transpose", "Where", "Tile"} & set(ops)
    widths = {v.name: v.type.tensor_type.shape.dim[-1].dim_value for v in model.graph.value_info}
    head_dim = 8
    for node in (n for n in nodes if n.op_type == "Attention"):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        # query, key, value, and no past; a mask only on a sliding-window layer (Gemma's layer 0)
        windowed = arch in ("gemma2", "gemma3_text") and node.name.startswith("layer0/")
        assert len(node.input) == (4 if windowed else 3)
        assert attrs["is_causal"] == 1 and (attrs["q_num_heads"], attrs["kv_num_heads"]) == (HEADS, KV_HEADS)
        # Grouped K/V as the model has them (3D, kv_heads wide), never repeated to every query head.
        qkv = list(node.input[:3])
        assert [widths[i] for i in qkv] == [HEADS * head_dim, KV_HEADS * head_dim, KV_HEADS * head_dim]


def test_lean_fp32_scores_equal_pytorch_on_right_padded_mixed_batches_through_rmserve_serve(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    """One server holds them all; the scores of 32 mixed-length items equal each item's PyTorch score
    alone, and so do ONNX Runtime's CPU provider and OpenVINO on right-padded batches of 1, 7 and 32."""
    items = mixed_items()
    env = {
        "RMSERVE_MODELS": ",".join(f"{arch}={bundles[arch]}" for arch in LEAN),
        "RMSERVE_PRECISION": "fp32",
        "RMSERVE_CACHE": "off",
    }
    body = [{"prompt": item.prompt, "response": item.response} for item in items]
    with serve(env, tmp_path) as server:
        served = {}
        for arch in LEAN:
            resp = httpx.post(server.url + "/v1/score", json={"model": arch, "items": body}, timeout=120)
            assert resp.status_code == 200, resp.text
            served[arch] = np.array(resp.json()["scores"])
    for arch in LEAN:
        bundle = load_bundle(bundles[arch])
        model, _, _ = load_score_model(bundles[arch].parent / "checkpoint")  # eager attention, fp32
        encoded = Formatter(bundle).encode(items)
        pad = bundle.manifest.format.pad_token_id
        alone = np.concatenate([torch_scores(model, pad_rows([e], pad)) for e in encoded])
        assert len({len(e) for e in encoded}) > 20  # mixed lengths: every batch below is padded
        np.testing.assert_allclose(served[arch], alone, rtol=1e-4, atol=1e-4)
        engines = [OnnxRuntimeEngine(bundle.model_path), OpenVinoEngine(bundle.model_path, threads=2)]
        try:
            for engine in engines:
                for size in (1, 7, 32):
                    batches = [encoded[i : i + size] for i in range(0, len(encoded), size)]
                    got = np.concatenate([engine.infer(pad_rows(b, pad, "right")) for b in batches])
                    np.testing.assert_allclose(got, alone, rtol=1e-4, atol=1e-4, err_msg=engine.info.provider)
        finally:
            for engine in engines:
                engine.close()


@pytest.mark.parametrize("provider", ["cpu", "openvino"])
def test_the_served_engine_refuses_a_left_padded_batch_for_a_lean_bundle(
    provider: str, bundles: dict[str, Path], tiny_bundles: dict[str, Path]
) -> None:
    settings = Settings.model_validate({"provider": provider, "precision": "fp32"})
    bundle = load_bundle(bundles["qwen2"])
    encoded = Formatter(bundle).encode(mixed_items(6))
    pad = bundle.manifest.format.pad_token_id
    engine, _ = create_engine(bundle, settings)
    try:
        assert engine.infer(pad_rows(encoded, pad, "right")).shape == (6,)
        with pytest.raises(
            BatchRefused, match=r"bundle 'tiny-qwen2' requires right padding .* rows \["
        ) as refused:
            engine.infer(pad_rows(encoded, pad, "left"))
        assert "manifest padding=right" in str(refused.value)
    finally:
        engine.close()
    # A traced bundle reads its mask: either side is scored (and right, tests/test_export.py).
    traced = load_bundle(tiny_bundles["bert"])
    engine, _ = create_engine(traced, settings)
    try:
        engine.infer(pad_rows(Formatter(traced).encode(mixed_items(6)), 0, "left"))
    finally:
        engine.close()


def overflowing_checkpoint(directory: Path) -> Path:
    """A tiny Llama whose token embeddings are scaled up 15,000x: its residual stream reaches about
    ten thousand, over float16's range divided by the margin, while RMSNorm keeps its scores sane."""
    import torch
    from transformers import AutoModelForSequenceClassification

    checkpoint = tiny_checkpoint("llama", directory, seed=3)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(15000.0)
    model.save_pretrained(checkpoint)
    return checkpoint


def float_types(model: onnx.ModelProto) -> Counter[int]:
    """Element types of every float value a node computes."""
    inferred = onnx.shape_inference.infer_shapes(model)
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
    return Counter(
        v.type.tensor_type.elem_type
        for v in inferred.graph.value_info
        if v.type.tensor_type.elem_type in floats
    )


def test_fp16_keeps_the_residual_guard_only_for_a_model_whose_stream_overflows_its_headroom(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    normal = export_bundle(bundles["llama"].parent / "checkpoint", tmp_path / "normal", precision="fp16")
    record = normal.parity["fp16"]
    assert record["residual_guard"] is False and record["headroom"]["fits_fp16"] is True
    assert 0 < record["headroom"]["residual_max_abs"] <= FP16_MAX / MARGIN
    assert record["pairwise_ranking_agreement"] >= 0.98 and normal.padding == "right"
    graph = onnx.load(str(tmp_path / "normal" / MODEL_FILE))
    # Every layer entirely in fp16: no float32 value but the scores, one Cast (fp16 scores -> float32).
    assert set(float_types(graph)) == {TensorProto.FLOAT16}
    assert [n.op_type for n in graph.graph.node].count("Cast") == 1

    hot = export_bundle(
        overflowing_checkpoint(tmp_path / "hot-checkpoint"), tmp_path / "hot", precision="fp16"
    )
    record = hot.parity["fp16"]
    assert record["residual_guard"] is True and record["headroom"]["fits_fp16"] is False
    assert record["headroom"]["residual_max_abs"] > FP16_MAX / MARGIN
    assert "the residual stream stays fp32" in record["residual_guard_reason"]
    assert record["pairwise_ranking_agreement"] >= 0.98
    graph = onnx.load(str(tmp_path / "hot" / MODEL_FILE))
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in onnx.shape_inference.infer_shapes(graph).graph.value_info
    }
    residual = [n.output[0] for n in graph.graph.node if n.op_type == "Add" and n.name.startswith("layer")]
    assert len(residual) == 2 * LAYERS and {types[r] for r in residual} == {TensorProto.FLOAT}
    assert TensorProto.FLOAT16 in set(float_types(graph))  # the products still run in fp16


def test_bf16_is_the_lean_graph_built_in_bfloat16_checked_on_openvino_and_refused_on_a_cpu(
    bundles: dict[str, Path], tmp_path: Path, tiny_bundles: dict[str, Path]
) -> None:
    checkpoint = bundles["qwen3"].parent / "checkpoint"
    manifest = export_bundle(checkpoint, tmp_path / "bf16", precision="bf16")
    assert (manifest.precision, manifest.graph, manifest.padding) == ("bf16", "lean", "right")
    record = manifest.parity["bf16"]
    assert record["engine"].startswith("openvino/") and record["pairwise_ranking_agreement"] >= 0.98
    assert record["residual_guard"] is False and "CUDA" in record["not_verified_here"]
    assert manifest.parity["max_rel_diff"] <= 1e-4  # the fp32 lean graph it was rebuilt from passed parity
    bf16 = onnx.load(str(tmp_path / "bf16" / MODEL_FILE))
    onnx.checker.check_model(bf16, full_check=True)
    fp32 = onnx.load(str(bundles["qwen3"] / MODEL_FILE))
    # Node for node the fp32 graph, then one Cast of the scores to float32; every weight bfloat16.
    assert [n.op_type for n in bf16.graph.node] == [n.op_type for n in fp32.graph.node] + ["Cast"]
    floats = {t.data_type for t in bf16.graph.initializer if t.data_type != TensorProto.INT64}
    assert floats == {TensorProto.BFLOAT16}
    assert {n.op_type for n in bf16.graph.node} <= BF16_CUDA_OPS
    weight = next(t for t in bf16.graph.initializer if t.name.startswith("layer0/qkv"))
    assert numpy_helper.to_array(weight).dtype.name == "bfloat16"
    with pytest.raises(EngineError, match="made for the GPU"):
        candidates(load_bundle(tmp_path / "bf16"), Settings.model_validate({"provider": "auto"}))
    with pytest.raises(ExportError, match="bf16 bundles are written by the lean graph builder"):
        export_bundle(tiny_bundles["bert"].parent / "checkpoint", tmp_path / "bert-bf16", precision="bf16")


def test_a_bf16_bundle_is_refused_on_a_gpu_without_bf16_units() -> None:
    assert bf16_problem((8, 0)) is None and bf16_problem((9, 0)) is None and bf16_problem(None) is None
    problem = bf16_problem((7, 5))
    assert problem is not None and "7.5" in problem and "--precision fp16" in problem


def test_a_sliding_window_shorter_than_max_length_takes_the_lean_graph_and_another_family_does_not() -> None:
    from transformers import AutoConfig

    mistral = AutoConfig.for_model("mistral", sliding_window=64)
    assert why_not_lean(mistral, 64) is None and why_not_lean(mistral, 128) is None  # a mask, not a refusal
    assert layer_windows(mistral) == (64,) * mistral.num_hidden_layers
    qwen2 = AutoConfig.for_model("qwen2", use_sliding_window=True, sliding_window=32, max_window_layers=0)
    assert why_not_lean(qwen2, 128) is None and set(layer_windows(qwen2)) == {32}
    assert set(layer_windows(AutoConfig.for_model("qwen2", sliding_window=32))) == {None}  # not used
    gemma2 = AutoConfig.for_model("gemma2", num_hidden_layers=4, sliding_window=16)
    assert why_not_lean(gemma2, 128) is None and layer_windows(gemma2) == (16, None, 16, None)
    phi3 = why_not_lean(AutoConfig.for_model("phi3"), 128)
    assert phi3 is not None and phi3.startswith("phi3 has no lean graph")
    dynamic = AutoConfig.for_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    assert "depends on the sequence length" in str(why_not_lean(dynamic, 128))


def test_graph_lean_fails_with_the_reason_where_it_does_not_apply(tmp_path: Path) -> None:
    from rmserve.models.export_command import main

    checkpoint = tiny_checkpoint("llama", tmp_path / "dynamic")
    config = json.loads((checkpoint / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="--graph lean: rope_type 'dynamic' depends on the sequence length"):
        export_bundle(checkpoint, tmp_path / "out", graph="lean")
    assert not (tmp_path / "out").exists()
    assert main([str(checkpoint), str(tmp_path / "cli"), "--graph", "lean"]) == 1


def test_a_gemma2_reward_model_takes_the_lean_graph_with_soft_capping_and_a_window_shorter_than_max_length(
    bundles: dict[str, Path],
) -> None:
    """The tiny Gemma-2 has Gemma-2's config fields: query_pre_attn_scalar, attn_logit_softcapping 50,
    final_logit_softcapping, sliding_window 16 on alternate layers (layer_types), against max_length 128."""
    bundle = load_bundle(bundles["gemma2"])
    assert bundle.manifest.format.max_length == 128 and bundle.manifest.parity["max_abs_diff"] <= 1e-5
    nodes = graph_of(bundles["gemma2"]).graph.node
    attention = {n.name.split("/")[0]: n for n in nodes if n.op_type == "Attention"}
    softcaps = [a.f for n in attention.values() for a in n.attribute if a.name == "softcap"]
    assert softcaps == [50.0] * LAYERS
    # layer_types: sliding, full. The sliding layer reads the window mask; the full one reads none.
    assert (len(attention["layer0"].input), len(attention["layer1"].input)) == (4, 3)
    assert sum(n.op_type == "Gelu" for n in nodes) == LAYERS
    assert [n.op_type for n in nodes if n.name.startswith("embed/")] == ["Gather", "Mul"]
    # Against transformers' Gemma2 (eager attention) on items longer than the window, right-padded.
    model, _, _ = load_score_model(bundles["gemma2"].parent / "checkpoint")
    encoded = Formatter(bundle).encode(mixed_items())
    assert max(len(e.ids) for e in encoded) > 16
    batch = pad_rows(encoded, bundle.manifest.format.pad_token_id, "right")
    engine = OnnxRuntimeEngine(bundle.model_path)
    try:
        served = engine.infer(batch)
    finally:
        engine.close()
    np.testing.assert_allclose(served, torch_scores(model, batch), rtol=1e-4, atol=1e-5)


def test_gemma2_exports_a_bf16_bundle_and_its_fp16_bundle_is_decided_by_measured_headroom(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    checkpoint = bundles["gemma2"].parent / "checkpoint"
    bf16 = export_bundle(checkpoint, tmp_path / "bf16", precision="bf16")
    assert bf16.graph == "lean" and bf16.parity["bf16"]["residual_guard"] is False
    assert bf16.parity["bf16"]["pairwise_ranking_agreement"] >= 0.98
    fp16 = export_bundle(checkpoint, tmp_path / "fp16", precision="fp16")
    record = fp16.parity["fp16"]
    assert record["residual_guard"] is (not record["headroom"]["fits_fp16"])
    assert record["headroom"]["residual_max_abs"] > 0
