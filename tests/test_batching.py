"""The batcher's plan (cheapest cuts of a length-sorted window) and its streams (batches side by
side on one engine): scores stay exact whatever shares a batch or runs beside it."""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rmserve.batching import Batcher, BatchPolicy
from rmserve.bundle import load_bundle
from rmserve.engines.base import TokenBatch, infer_all, pad_batch
from rmserve.engines.onnxruntime import OnnxRuntimeEngine
from rmserve.engines.openvino import OpenVinoEngine
from rmserve.engines.select import default_streams
from rmserve.formatting import Encoded, Formatter
from rmserve.items import PairItem
from rmserve.metrics import Metrics
from rmserve.planning import greedy_batches, plan_batches


def cost(lengths: list[int], ends: list[int], overhead: int) -> int:
    total, first = 0, 0
    for end in ends:
        total += overhead + (end - first) * lengths[end - 1]
        first = end
    return total


def every_cut(n: int) -> list[list[int]]:
    """All ways to split n sorted items into consecutive batches (as end indices)."""
    out = []
    for mask in itertools.product([False, True], repeat=n - 1):
        out.append([i + 1 for i, cut in enumerate(mask) if cut] + [n])
    return out


def fits(lengths: list[int], ends: list[int], budget: int) -> bool:
    first = 0
    for end in ends:
        if end - first > 1 and (end - first) * lengths[end - 1] > budget:
            return False
        first = end
    return True


def test_the_plan_is_the_cheapest_cut_within_the_budget() -> None:
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(1, 9)
        lengths = sorted(rng.randint(1, 300) for _ in range(n))
        budget = rng.choice([256, 512, 1024, 4096])
        overhead = rng.choice([0, 16, 64, 512])
        ends = plan_batches(lengths, budget, overhead)
        assert ends[-1] == n and ends == sorted(set(ends))
        assert fits(lengths, ends, budget)
        best = min(cost(lengths, e, overhead) for e in every_cut(n) if fits(lengths, e, budget))
        assert cost(lengths, ends, overhead) == best


def test_like_lengths_share_a_batch_and_an_oversized_item_runs_alone() -> None:
    # Short and long items apart: padding 10-token items to 250 costs more than a second call,
    # and a cheap enough call splits off the 250 too.
    assert plan_batches([10, 11, 12, 200, 210, 250], 2048, 128) == [3, 6]
    assert plan_batches([10, 11, 12, 200, 210, 250], 2048, 32) == [3, 5, 6]
    # With a per-call price far above the padding, one batch.
    assert plan_batches([10, 11, 12, 200, 210, 250], 2048, 100_000) == [6]
    assert plan_batches([10, 3000], 2048, 64) == [1, 2]
    assert plan_batches([], 2048, 64) == []
    # The greedy cut (used on long queues) fills the budget in order.
    assert greedy_batches([100] * 50, 2048) == [20, 40, 50]
    assert greedy_batches([10, 3000], 2048) == [1, 2]


def test_default_streams_follow_the_cpus() -> None:
    assert [default_streams(n) for n in (1, 2, 4, 7, 8, 16, 64)] == [1, 2, 2, 2, 2, 4, 8]


def _items(bundle_dir: Path, n: int) -> list[Encoded]:
    rng = random.Random(3)
    words = [
        "reward",
        "model",
        "answer",
        "question",
        "kind",
        "helpful",
        "sorry",
        "cannot",
        "explain",
        "because",
    ]
    pairs = [
        PairItem(
            " ".join(rng.choices(words, k=rng.randint(1, 40))),
            " ".join(rng.choices(words, k=rng.randint(1, 30))),
        )
        for _ in range(n)
    ]
    return Formatter(load_bundle(bundle_dir)).encode(pairs)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_two_streams_score_exactly_like_one(backend: str, tiny_bundles: dict[str, Path]) -> None:
    bundle = load_bundle(tiny_bundles["llama"])
    items = _items(tiny_bundles["llama"], 48)
    pad = bundle.manifest.format.pad_token_id
    batches = [pad_batch([e.ids for e in items[i : i + 4]], pad) for i in range(0, len(items), 4)]
    make = {
        "onnxruntime": lambda s: OnnxRuntimeEngine(bundle.model_path, threads=2, streams=s),
        "openvino": lambda s: OpenVinoEngine(bundle.model_path, threads=2, streams=s),
    }[backend]
    one, two = make(1), make(2)
    assert (one.info.streams, two.info.streams) == (1, 2)
    serial = np.concatenate([one.infer(b) for b in batches])
    side_by_side = np.concatenate(infer_all(two, batches * 3)).reshape(3, -1)
    for run in side_by_side:
        np.testing.assert_allclose(run, serial, rtol=1e-5, atol=1e-6)
    one.close()
    two.close()


class CountingEngine:
    """The real ONNX Runtime engine, counting how many forward passes run at once."""

    def __init__(self, inner: OnnxRuntimeEngine) -> None:
        self.inner = inner
        self.info = inner.info
        self._lock = threading.Lock()
        self.now = 0
        self.peak = 0
        self.batches: list[int] = []

    def infer(self, batch: TokenBatch) -> np.ndarray:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
            self.batches.append(batch.shape[0])
        try:
            time.sleep(0.01)  # long enough that a second stream's batch overlaps
            return self.inner.infer(batch)
        finally:
            with self._lock:
                self.now -= 1

    def close(self) -> None:
        self.inner.close()


def test_the_batcher_runs_its_streams_side_by_side_with_exact_scores(tiny_bundles: dict[str, Path]) -> None:
    path = tiny_bundles["bert"]
    bundle = load_bundle(path)
    items = _items(path, 96)
    reference = OnnxRuntimeEngine(bundle.model_path, threads=1)
    alone = [float(reference.infer(pad_batch([e.ids], 0, [e.type_ids]))[0]) for e in items]
    reference.close()
    engine = CountingEngine(OnnxRuntimeEngine(bundle.model_path, threads=2, streams=2))

    async def run() -> list[float]:
        batcher = Batcher(
            "t",
            engine,
            BatchPolicy(max_batch_tokens=256, max_wait_s=0.0, max_queue_items=1000),
            pad_id=0,
            with_type_ids=True,
            metrics=Metrics(),
        )
        batcher.start()
        deadline = time.monotonic() + 600
        futures = []
        for start in range(0, len(items), 3):  # many small requests, arriving over time
            futures += batcher.submit(items[start : start + 3], deadline)
            await asyncio.sleep(0.001)
        scores = await asyncio.gather(*futures)
        await batcher.stop()
        return scores

    scores = asyncio.run(run())
    np.testing.assert_allclose(scores, alone, rtol=1e-5, atol=1e-6)
    assert engine.peak == 2
    assert max(engine.batches) > 1 and sum(engine.batches) == len(items)
