"""The GPU path, on the CPU (CI has no GPU): fp16 export, the IO-binding engine, and asking for cuda.

Everything the CUDA path runs that does not need a GPU runs here: the fp16 conversion with its
overflow guard and its parity report, the engine's IO binding (the same code, bound to "cpu"),
and the start-up failure when ``cuda`` is asked for where there is none. The GPU measurements
themselves are loadtests/gpu_check.sh (docs/gpu.md).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import rmserve.models.export as export_mod
from rmserve.bundle import MODEL_FILE, load_bundle
from rmserve.config import Settings
from rmserve.engines.base import EngineError, pad_batch
from rmserve.engines.batches import pad_rows
from rmserve.engines.onnxruntime import OnnxRuntimeEngine, cuda_present
from rmserve.engines.select import candidates, create_engine
from rmserve.formatting import Formatter
from rmserve.models.export import export_bundle
from rmserve.models.fp16 import FP32_OPS, convert_model_fp16, guarded_nodes, measure_fp16
from rmserve.models.heads import load_score_model
from rmserve.models.parity import compared_sides, reference_pairs, reference_scores
from tests.support.server import serve

no_gpu = pytest.mark.skipif(
    cuda_present(), reason="this machine has CUDA; the failure cases need its absence"
)


@pytest.fixture(scope="module")
def exported_fp16(tiny_bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The qwen2 tiny checkpoint through ``export_bundle(precision="fp16")``.

    The traced fp32 graph of the session's tiny bundle is reused (tracing is covered by
    test_export.py); fp32 parity, the fp16 rewrite, its measurement and the manifest run for real.
    """
    fp32 = tiny_bundles["qwen2"]

    def traced(model: object, meta: object, directory: Path, **_: object) -> str:
        shutil.copyfile(fp32 / MODEL_FILE, directory / MODEL_FILE)
        return "reused"

    dest = tmp_path_factory.mktemp("fp16") / "qwen2"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export_mod, "export_onnx", traced)
        export_bundle(fp32.parent / "checkpoint", dest, name="tiny-qwen2-fp16", precision="fp16")
    return dest


@pytest.fixture(scope="module")
def converted(tiny_bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> the fp32 tiny bundle's graph through models/fp16.py's converter alone."""
    root = tmp_path_factory.mktemp("fp16-guarded")
    out = {}
    for arch in ("qwen2", "bert"):
        out[arch] = root / arch / MODEL_FILE
        convert_model_fp16(tiny_bundles[arch] / MODEL_FILE, out[arch], external_data_bytes=0)
    return out


def test_fp16_export_records_deviation_and_ranking(exported_fp16: Path) -> None:
    m = load_bundle(exported_fp16).manifest
    assert m.precision == "fp16"
    fp16 = m.parity["fp16"]
    assert fp16["reference"] == "fp32 PyTorch"
    assert fp16["pairwise_ranking_agreement"] >= 0.98
    assert 0 < fp16["max_abs_diff"] < 0.05 and np.isfinite(fp16["max_rel_diff"])
    assert m.parity["max_rel_diff"] <= 1e-4  # the fp32 graph passed parity first
    graph = onnx.load(str(exported_fp16 / MODEL_FILE)).graph
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # scores stay float32


def test_fp16_bundle_runs_on_the_cpu_within_its_recorded_deviation(
    exported_fp16: Path, tiny_bundles: dict[str, Path]
) -> None:
    """ORT's CPU provider runs the fp16 graph (slowly, correctly) through the IO-binding engine."""
    fp16, fp32 = load_bundle(exported_fp16), load_bundle(tiny_bundles["qwen2"])
    half = OnnxRuntimeEngine(fp16.model_path, provider="cpu", threads=2, precision="fp16")
    full = OnnxRuntimeEngine(fp32.model_path, provider="cpu", threads=2)
    pairs, _ = reference_pairs(32)
    encoded = Formatter(fp16).encode([p.as_item(True) for p in pairs])
    pad = fp16.manifest.format.pad_token_id
    recorded = fp16.manifest.parity["fp16"]
    bound = recorded["max_abs_diff"] + recorded["batch_drift_max"] * 4 + 1e-4  # fp32 itself is within 1e-4
    for side in compared_sides(fp16.manifest):
        for start in range(0, len(encoded), 8):
            batch = pad_rows(encoded[start : start + 8], pad, side)
            a, b = half.infer(batch), full.infer(batch)
            assert a.dtype == np.float32 and np.isfinite(a).all()
            assert np.abs(a - b).max() <= bound


@pytest.mark.parametrize("arch", ["qwen2", "bert"])
def test_guarded_conversion_agrees_with_fp32_pytorch(
    arch: str, converted: dict[str, Path], tiny_bundles: dict[str, Path]
) -> None:
    bundle = load_bundle(tiny_bundles[arch])
    model, _, _ = load_score_model(tiny_bundles[arch].parent / "checkpoint")
    pairs, source = reference_pairs(32)
    encoded = Formatter(bundle).encode([p.as_item(arch == "qwen2") for p in pairs])
    reference = reference_scores(model, encoded, bundle.manifest.format.pad_token_id)
    engine = OnnxRuntimeEngine(converted[arch], provider="cpu", threads=2, precision="fp16")
    report = measure_fp16(bundle, engine, encoded, reference, text_source=source, batch_sizes=(1, 8))
    assert report.ok, report.problems
    assert report.max_rel_diff < 0.02 and report.extra["ranking_agreement"] >= 0.99


def test_overflow_guard_keeps_norms_softmax_and_residual_adds_in_fp32(
    converted: dict[str, Path], tiny_bundles: dict[str, Path]
) -> None:
    fp32 = onnx.load(str(tiny_bundles["qwen2"] / MODEL_FILE))
    kept = guarded_nodes(fp32)
    # The lean graph, 2 layers: 4 residual adds, each feeding the next RMSNormalization (the last one
    # through the reshape and the gather of each row's last token). No epsilon adds (RMSNorm is one
    # op), no mask adds (no mask), and Qwen2's q/k/v bias add feeds no norm.
    assert len(kept) == 4 and all(name.startswith("layer") for name in kept)
    assert {n.op_type for n in fp32.graph.node} >= {"Attention", "RMSNormalization"}
    fp16 = onnx.load(str(converted["qwen2"]))
    types = {v.name: v.type.tensor_type.elem_type for v in [*fp16.graph.value_info, *fp16.graph.output]}
    outputs = {n.name: n.output[0] for n in fp16.graph.node}
    for name in kept:
        assert types.get(outputs[name]) == onnx.TensorProto.FLOAT, name
    norms = [n for n in fp16.graph.node if n.op_type in FP32_OPS and n.output[0] in types]
    assert [n.op_type for n in norms].count("RMSNormalization") == 5  # 2 per layer and the final one
    for node in norms:  # float ones; ReduceSum also counts the int64 mask
        assert types[node.output[0]] != onnx.TensorProto.FLOAT16, node.name
    halves = [
        numpy_helper.to_array(t, base_dir=str(converted["qwen2"].parent))
        for t in fp16.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT16
    ]
    assert halves and max(float(np.abs(h).max()) for h in halves) <= 32768  # constants clamped


def test_io_binding_equals_a_plain_run_and_buffers_do_not_alias(tiny_bundles: dict[str, Path]) -> None:
    bundle = load_bundle(tiny_bundles["qwen2"])
    engine = OnnxRuntimeEngine(bundle.model_path, provider="cpu", threads=2)
    assert engine.info.detail["io_binding"] is True
    plain = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    results = []
    for rows in (3, 100, 2):  # grows the bound output buffer, then reuses it
        lengths = rng.integers(4, 40, size=rows)
        batch = pad_batch(
            [list(rng.integers(3, 300, size=n)) for n in lengths], bundle.manifest.format.pad_token_id
        )
        got = engine.infer(batch)
        (want,) = plain.run(["scores"], batch.feeds(["input_ids", "attention_mask"]))
        assert got.shape == (rows,)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        results.append((got, got.copy()))
    for got, snapshot in results:
        np.testing.assert_array_equal(got, snapshot)  # a later call never overwrote an earlier result
    engine.close()
    engine.close()  # idempotent: the batcher and its owner may both close it


@no_gpu
def test_cuda_without_a_gpu_fails_at_start_up_with_a_clear_message(tiny_bundles: dict[str, Path]) -> None:
    bundle = load_bundle(tiny_bundles["qwen2"])
    with pytest.raises(
        EngineError, match="CUDAExecutionProvider.*install onnxruntime-gpu instead of onnxruntime"
    ):
        create_engine(bundle, Settings.model_validate({"provider": "cuda"}))
    with pytest.raises(EngineError, match="onnxruntime-gpu"):
        OnnxRuntimeEngine(bundle.model_path, provider="cuda")


@no_gpu
def test_auto_falls_back_to_the_cpu_and_fp16_bundles_are_refused_there(
    tiny_bundles: dict[str, Path], exported_fp16: Path
) -> None:
    settings = Settings.model_validate({"provider": "auto", "precision": "fp32"})
    engine, selection = create_engine(load_bundle(tiny_bundles["qwen2"]), settings)
    assert selection["provider"] != "cuda" and engine.info.provider in ("cpu", "openvino")
    engine.close()
    with pytest.raises(EngineError, match="made for the GPU"):
        candidates(load_bundle(exported_fp16), Settings.model_validate({"provider": "auto"}))


@no_gpu
def test_server_asked_for_cuda_without_one_never_turns_ready(
    tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    env = {"RMSERVE_MODELS": f"m={tiny_bundles['qwen2']}", "RMSERVE_PROVIDER": "cuda", "RMSERVE_CACHE": "off"}
    with serve(env, tmp_path, ready=False) as server:
        deadline = time.monotonic() + 40
        while server.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if server.process.poll() is None:  # still up: it must never report ready
            try:
                status = httpx.get(server.url + "/health/ready", timeout=5).status_code
            except httpx.ConnectError:
                status = None  # not even listening
            assert status != 200
        else:
            assert server.process.returncode != 0
        assert "install onnxruntime-gpu instead of onnxruntime" in server.log()


def test_the_gpu_check_dry_run_measures_bf16_and_fp16_bundles_beside_pytorch_and_the_grpo_workload(
    tmp_path: Path,
) -> None:
    """loadtests/gpu_check.py --cpu-dry-run: the GPU check's code end to end, tiny shapes, on the CPU
    (fp16 on ONNX Runtime's CPU provider, bf16 on OpenVINO: the CPU provider has no bf16 kernels)."""
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(repo / "loadtests" / "gpu_check.py"), "--cpu-dry-run", "--no-http"]
        + ["--models", "tiny-llama", "--grpo-model", "tiny-llama"]
        + ["--work", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    paths = {row["path"] for row in result["rows"]}
    assert {"engine.infer x8", "batcher, 64 callers", "HF + SDPA"} <= paths
    assert set(result["models"]) == {"tiny-llama/bf16", "tiny-llama/fp16"}
    for summary in result["models"].values():
        assert (summary["graph"], summary["nodes_per_layer"]) == ("lean", 16)
        assert summary["residual_guard"] is False
        assert summary["parity"]["problems"] == [] and summary["parity"]["padding_sides"] == ["right"]
    assert result["grpo"]["workload"].startswith("4 prompts x 8 responses")
    rmserve = [row for row in result["grpo"]["rows"] if row["path"].startswith("rmserve")]
    hf = [row for row in result["grpo"]["rows"] if row["path"].startswith("HF + SDPA, micro-batches of 32")]
    assert len(rmserve) == len(hf) == 2
    # The batcher sorts what waits by length: it pads less than fixed micro-batches in arrival order.
    assert max(r["padded_fraction"] for r in rmserve) < min(r["padded_fraction"] for r in hf)
    table = (out / "gpu_check.md").read_text()
    assert "| engine / SDPA |" in table and "| tiny-llama/bf16 | 128 |" in table
    assert "GRPO-shaped workload: 4 prompts x 8 responses" in table
