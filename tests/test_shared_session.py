"""ONNX Runtime on the CPU: an engine's streams are lanes over one session per graph, and lanes that
run side by side on real threads give bit for bit the scores one lane gives alone (fp32).

A real tiny Qwen2 bundle exported with its prefix-reuse graph; no mocks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnxruntime as ort
import pytest

from rmserve.bundle import load_bundle
from rmserve.config import Settings
from rmserve.engines.base import TokenBatch, pad_batch, shared_session_threads
from rmserve.engines.onnxruntime import OnnxRuntimeEngine
from rmserve.engines.past import PastOutput, PastPass, PastRunner
from rmserve.engines.reuse import PrefixReusingEngine, with_prefix_reuse
from rmserve.engines.select import create_engine
from tests.support.tiny import tiny_bundle

T = TypeVar("T")
ROUNDS = 12


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle("qwen2", tmp_path_factory.mktemp("shared-qwen2"), max_length=512)


def side_by_side(work: list[Callable[[], T]], rounds: int = ROUNDS) -> list[list[T]]:
    """Each callable on its own thread, ``rounds`` times, every round started together."""
    start = threading.Barrier(len(work))
    results: list[list[T]] = [[] for _ in work]
    errors: list[BaseException] = []

    def lane(i: int) -> None:
        try:
            for _ in range(rounds):
                start.wait()
                results[i].append(work[i]())
        except BaseException as exc:  # reported on the test's thread
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=lane, args=(i,)) for i in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def batches(pad: int) -> list[TokenBatch]:
    rng = np.random.default_rng(3)
    return [
        pad_batch([rng.integers(5, 200, n).tolist() for n in (40, 17, 33)], pad),
        pad_batch([rng.integers(5, 200, n).tolist() for n in (120, 64)], pad),
    ]


def test_the_shared_session_has_the_streams_callers_and_its_workers_make_the_threads() -> None:
    assert [shared_session_threads(t, s) for t, s in ((1, 1), (2, 2), (2, 1), (3, 2), (8, 2), (16, 4))] == [
        1,
        1,
        2,
        2,
        7,
        13,
    ]


def test_two_streams_hold_one_session_and_score_side_by_side_exactly_as_one_lane_alone(qwen2: Path) -> None:
    bundle = load_bundle(qwen2)
    pad = bundle.manifest.format.pad_token_id
    alone = OnnxRuntimeEngine(bundle.model_path, threads=1, streams=1)
    expected = [alone.infer(b) for b in batches(pad)]
    alone.close()

    engine = OnnxRuntimeEngine(bundle.model_path, threads=2, streams=2)
    assert engine.info.streams == 2 and engine.info.detail["sessions"] == 1
    lanes = [engine._lanes.get() for _ in range(2)]
    assert lanes[0] is not lanes[1] and lanes[0].binding is not lanes[1].binding
    assert lanes[0].session is lanes[1].session
    for lane in lanes:
        engine._lanes.put(lane)

    both = batches(pad)
    results = side_by_side([lambda: engine.infer(both[0]), lambda: engine.infer(both[1])])
    for got, want in zip(results, expected, strict=True):
        for scores in got:
            np.testing.assert_array_equal(scores, want)  # bit-identical, not merely close
    engine.close()


def past_passes(runner: PastRunner, pad: int) -> tuple[PastPass, PastPass]:
    """A pass with no past, and one that continues a 64-token past computed by the runner."""
    rng = np.random.default_rng(5)
    prefix = rng.integers(5, 200, (2, 64))
    keys, values = runner.empty(2)
    ones = np.ones_like(prefix)
    first = runner.run(PastPass(prefix, ones, np.zeros((2, 0), np.int64), keys, values), presents=True)
    assert first.keys is not None and first.values is not None
    new = rng.integers(5, 200, (2, 9))
    continuing = PastPass(new, np.ones_like(new), ones, first.keys, first.values)
    fresh_ids = rng.integers(5, 200, (3, 30))
    k0, v0 = runner.empty(3)
    fresh = PastPass(fresh_ids, np.ones_like(fresh_ids), np.zeros((3, 0), np.int64), k0, v0)
    return fresh, continuing


def same_output(a: PastOutput, b: PastOutput) -> None:
    np.testing.assert_array_equal(a.output, b.output)
    assert a.keys is not None and b.keys is not None and a.values is not None and b.values is not None
    np.testing.assert_array_equal(a.keys, b.keys)
    np.testing.assert_array_equal(a.values, b.values)


def test_the_prefix_reuse_runner_holds_one_session_and_its_passes_side_by_side_are_exact(qwen2: Path) -> None:
    bundle = load_bundle(qwen2)
    assert bundle.manifest.past_graph is not None
    path = bundle.path / bundle.manifest.past_graph
    pad = bundle.manifest.format.pad_token_id
    alone = PastRunner(path, threads=1, streams=1)
    passes = past_passes(alone, pad)
    expected = [alone.run(p, presents=True) for p in passes]
    alone.close()

    s = Settings(provider="cpu", precision="fp32", threads=2, streams=2)
    engine, _ = create_engine(bundle, s)
    reusing, about = with_prefix_reuse(engine, bundle, s, lambda event, amount: None)
    assert about["enabled"] and isinstance(reusing, PrefixReusingEngine)
    assert reusing.info.streams == 2
    runner = reusing.runner
    assert isinstance(runner._session, ort.InferenceSession)
    assert runner._session.get_session_options().intra_op_num_threads == 1

    results = side_by_side(
        [lambda: runner.run(passes[0], presents=True), lambda: runner.run(passes[1], presents=True)]
    )
    for got, want in zip(results, expected, strict=True):
        for out in got:
            same_output(out, want)
    reusing.close()
