"""A written graph run a piece at a time (models/piecewise.py): the streamed export's reduced-precision
check, which must not hold the whole model's weights at once.

Real tiny bundles exported here (tests/support/tiny.py, saved in bfloat16 as real checkpoints are), run
on ONNX Runtime's CPU provider and OpenVINO's CPU plugin. What it saves at real sizes is measured by
``python -m loadtests.export_memory`` (docs/export.md), not here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from rmserve.bundle import MODEL_FILE, load_bundle
from rmserve.engines.base import TokenBatch
from rmserve.engines.batches import pad_rows
from rmserve.engines.onnxruntime import OnnxRuntimeEngine
from rmserve.formatting import Formatter
from rmserve.items import TextItem
from rmserve.models import piecewise
from rmserve.models.export import export_bundle
from rmserve.models.piecewise import PiecewiseEngine, cut, openvino_loader, ort_loader, stored_bytes
from rmserve.models.process_heads import StepExport
from tests.support.tiny import STEP_TOKENS, tiny_process_checkpoint
from tests.test_streamed_export import bf16_checkpoint, items


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Qwen2 checkpoint saved in bf16, exported to an fp32 and a (streamed) fp16 bundle."""
    root = tmp_path_factory.mktemp("piecewise")
    checkpoint = bf16_checkpoint("qwen2", root / "checkpoint")
    out = {}
    for precision in ("fp32", "fp16"):
        out[precision] = root / precision
        export_bundle(checkpoint, out[precision], precision=precision, external_data_bytes=0)
    return out


def batches(bundle: Path) -> list[TokenBatch]:
    """The same items as one batch, and as three narrower batches of different widths."""
    loaded = load_bundle(bundle)
    encoded = Formatter(loaded).encode(items())
    pad = loaded.manifest.format.pad_token_id
    return [pad_rows(encoded, pad), *(pad_rows(encoded[i : i + 8], pad) for i in (0, 8, 16))]


def whole_graph(bundle: Path, batch: TokenBatch) -> np.ndarray:
    engine = OnnxRuntimeEngine(bundle / MODEL_FILE)
    try:
        return engine.infer(batch)
    finally:
        engine.close()


@pytest.mark.parametrize("budget", [1, 20_000, 10**9])
def test_an_fp32_graph_run_a_piece_at_a_time_scores_bit_for_bit_what_the_whole_graph_scores(
    bundles: dict[str, Path], budget: int
) -> None:
    bundle = bundles["fp32"]
    engine = PiecewiseEngine(bundle / MODEL_FILE, ort_loader, provider="cpu", precision="fp32", budget=budget)
    runs = batches(bundle)
    served = engine.infer_many(runs)
    for batch, scores in zip(runs, served, strict=True):
        np.testing.assert_array_equal(scores, whole_graph(bundle, batch))
    # budget 1: every node that reads a weight is a piece of its own; 10**9: one piece.
    nodes = len(onnx.load(str(bundle / MODEL_FILE), load_external_data=False).graph.node)
    pieces = engine.info.detail["pieces"]
    assert pieces == 1 if budget == 10**9 else 1 < pieces < nodes
    # The pieces' files were removed once loaded; the bundle's files are what they were.
    assert not list(bundle.glob(".piece-*"))


def test_the_pieces_keep_every_node_in_order_within_the_budget_and_name_the_weights_where_they_lie(
    bundles: dict[str, Path],
) -> None:
    model = onnx.load(str(bundles["fp16"] / MODEL_FILE), load_external_data=False)
    budget = 20_000
    pieces = cut(model, budget)
    assert [n.name for p in pieces for n in p.nodes] == [n.name for n in model.graph.node]
    stored = {t.name: t for t in model.graph.initializer}
    for piece in pieces:
        # Over the budget only where one node alone reads more than it.
        if piece.weight_bytes > budget:
            readers = [n for n in piece.nodes if any(i in stored for i in n.input)]
            assert len(readers) == 1, [n.name for n in readers]
        for tensor in piece.initializers:
            assert tensor is stored[tensor.name]  # the graph's own entry: same file, offset, length
            if tensor.data_location == TensorProto.EXTERNAL:
                assert not tensor.raw_data and stored_bytes(tensor) > 0
    # What crosses a cut is made before it and read after it.
    made: set[str] = {i.name for i in model.graph.input}
    for piece in pieces:
        assert set(piece.inputs) <= made
        made |= set(piece.outputs)
    assert model.graph.output[0].name in pieces[-1].outputs


def test_an_fp16_graph_run_a_piece_at_a_time_stays_within_float16_rounding_of_the_whole_graph(
    bundles: dict[str, Path],
) -> None:
    # ONNX Runtime's CPU provider computes most fp16 ops in float32 and drops the Casts between them;
    # at a cut the value is rounded to float16, the type the graph declares.
    bundle = bundles["fp16"]
    engine = PiecewiseEngine(bundle / MODEL_FILE, ort_loader, provider="cpu", precision="fp16", budget=20_000)
    batch = batches(bundle)[0]
    whole, pieces = whole_graph(bundle, batch), engine.infer(batch)
    assert engine.info.detail["pieces"] > 2
    assert np.abs(pieces - whole).max() <= 2e-2 * max(1.0, float(np.abs(whole).max()))


def test_openvino_runs_the_same_pieces_and_scores_what_its_whole_graph_scores(
    bundles: dict[str, Path],
) -> None:
    from rmserve.engines.openvino import OpenVinoEngine

    bundle = bundles["fp32"]
    batch = batches(bundle)[0]
    engine = PiecewiseEngine(
        bundle / MODEL_FILE, openvino_loader("fp32"), provider="openvino", precision="fp32", budget=20_000
    )
    whole = OpenVinoEngine(bundle / MODEL_FILE, threads=1, precision="fp32")
    try:
        np.testing.assert_allclose(engine.infer(batch), whole.infer(batch), rtol=1e-5, atol=1e-5)
    finally:
        whole.close()


def test_a_process_graph_run_a_piece_at_a_time_gives_each_token_its_value(tmp_path: Path) -> None:
    form = "qwen2-prm"
    checkpoint = tiny_process_checkpoint(form, tmp_path / "checkpoint")
    bundle = tmp_path / "bundle"
    export_bundle(checkpoint, bundle, step=StepExport(STEP_TOKENS[form]), external_data_bytes=0)
    loaded = load_bundle(bundle)
    step = STEP_TOKENS[form]
    texts = [f"a first step {step} then another {step}", f"one step {step}"]
    encoded = Formatter(loaded).encode([TextItem(t) for t in texts])
    batch = pad_rows(encoded, loaded.manifest.format.pad_token_id)
    engine = PiecewiseEngine(bundle / MODEL_FILE, ort_loader, provider="cpu", precision="fp32", budget=20_000)
    values = engine.infer(batch)
    assert values.shape == batch.shape
    np.testing.assert_array_equal(values, whole_graph(bundle, batch))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_a_streamed_reduced_export_checks_its_graph_a_piece_at_a_time_and_says_so(
    precision: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(piecewise, "BUDGET", 20_000)  # tiny weights: several pieces, as at 8B
    checkpoint = bf16_checkpoint("llama", tmp_path / "checkpoint")
    bundle = tmp_path / precision
    manifest = export_bundle(checkpoint, bundle, precision=precision, external_data_bytes=0)
    record = manifest.parity[precision]
    assert "a piece of the graph at a time" in record["engine"], record["engine"]
    assert record["pairwise_ranking_agreement"] >= 0.98
    assert not list(bundle.glob(".piece-*"))
    # The bundle checked is the bundle served: its whole graph loads and ranks as the check measured.
    served = load_bundle(bundle)
    assert served.manifest.precision == precision


def test_a_streamed_fp32_export_holds_parity_a_piece_at_a_time_and_its_whole_graph_serves_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(piecewise, "BUDGET", 20_000)
    checkpoint = bf16_checkpoint("qwen2", tmp_path / "checkpoint")
    streamed = export_bundle(checkpoint, tmp_path / "streamed", external_data_bytes=0)
    in_memory = export_bundle(checkpoint, tmp_path / "in-memory")
    assert "a piece of the graph at a time" in streamed.parity["engine"]
    assert "engine" not in in_memory.parity  # a bundle built in memory is checked whole
    # fp32 pieces score bit for bit what the whole graph scores, so both exports measured the same.
    for field in ("max_abs_diff", "max_rel_diff", "batch_invariance_max"):
        assert streamed.parity[field] == in_memory.parity[field], field
    batch = batches(tmp_path / "streamed")[0]
    np.testing.assert_array_equal(
        whole_graph(tmp_path / "streamed", batch), whole_graph(tmp_path / "in-memory", batch)
    )
