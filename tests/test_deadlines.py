"""Deadlines in the batcher: each request's own timer, admission that refuses work which cannot end
in time, an admission that waits for room until a deadline of its own, and a floor under the deadline
a request may ask for: the model's fastest forward pass."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from rmserve.app import create_app
from rmserve.batching import Batcher, BatchPolicy
from rmserve.bundle import Bundle, load_bundle
from rmserve.config import Settings
from rmserve.engines.base import TokenBatch
from rmserve.engines.onnxruntime import OnnxRuntimeEngine
from rmserve.engines.select import create_engine
from rmserve.errors import DeadlineExceeded, Overloaded
from rmserve.formatting import Encoded, Formatter
from rmserve.items import PairItem
from rmserve.metrics import Metrics
from tests.support.inproc import serve_app
from tests.support.server import wait_ready


class HeldEngine:
    """The real engine, whose forward passes wait until the test releases them (a test-only wrapper:
    no real input makes a forward pass last exactly as long as a test needs)."""

    def __init__(self, inner: OnnxRuntimeEngine) -> None:
        self.inner = inner
        self.info = inner.info
        self.released = threading.Event()
        self.released.set()
        self.entered = threading.Event()  # a forward pass has begun (and holds its items)

    def infer(self, batch: TokenBatch) -> np.ndarray:
        self.entered.set()
        self.released.wait(600)  # a ceiling for a stuck test, not a speed
        return self.inner.infer(batch)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def engine_and_items(tiny_bundles: dict[str, Path]):  # type: ignore[no-untyped-def]
    bundle = load_bundle(tiny_bundles["bert"])
    items = Formatter(bundle).encode([PairItem(f"question {i}", f"answer {i}") for i in range(64)])
    engine = HeldEngine(OnnxRuntimeEngine(bundle.model_path, threads=1))
    yield engine, items
    engine.released.set()


def _batcher(engine: HeldEngine, max_queue_items: int = 4096) -> Batcher:
    policy = BatchPolicy(max_batch_tokens=64, max_wait_s=0.0, max_queue_items=max_queue_items)
    return Batcher("t", engine, policy, pad_id=0, with_type_ids=True, metrics=Metrics())


async def _hold_the_engine(
    batcher: Batcher, engine: HeldEngine, items: list[Encoded]
) -> asyncio.Future[float]:
    """Hold the engine inside a forward pass on ``items[0]``, once the pass has taken it (however
    long a busy machine takes to start it); returns that item's future."""
    engine.released.clear()
    engine.entered.clear()
    held = batcher.submit(items[:1], time.monotonic() + 600)[0]
    deadline = time.monotonic() + 600  # a ceiling for a stuck test, not a speed
    while not engine.entered.is_set():
        assert time.monotonic() < deadline, "the forward pass never began"
        await asyncio.sleep(0.01)
    return held


def test_a_waiting_request_gets_its_504_when_its_deadline_passes(engine_and_items) -> None:  # type: ignore[no-untyped-def]
    engine, items = engine_and_items

    async def run() -> None:
        batcher = _batcher(engine)
        batcher.start()
        busy = await _hold_the_engine(batcher, engine, items)
        late = batcher.submit(items[1:9], time.monotonic() + 0.3)
        assert batcher.queued == 8
        with pytest.raises(DeadlineExceeded):
            await asyncio.gather(*late)
        # The engine is still held: the 504 came from the request's own timer, not from the loop,
        # and its items left the queue.
        assert not engine.released.is_set()
        assert batcher.queued == 0
        engine.released.set()
        await busy
        await batcher.stop()

    asyncio.run(run())


def test_admission_refuses_work_that_cannot_end_by_its_deadline(engine_and_items) -> None:  # type: ignore[no-untyped-def]
    engine, items = engine_and_items

    async def run() -> None:
        batcher = _batcher(engine)
        batcher.start()
        # A measured rate first: the estimate needs one.
        await asyncio.gather(*batcher.submit(items, time.monotonic() + 60))
        busy = await _hold_the_engine(batcher, engine, items)
        ahead = batcher.submit(items * 40, time.monotonic() + 60)  # 2,560 items queued
        with pytest.raises(Overloaded) as refused:
            batcher.submit(items[:1], time.monotonic() + 0.001)
        assert "deadline" in refused.value.message and refused.value.retry_after_s > 0
        assert int(refused.value.headers()["Retry-After"]) >= 1
        assert batcher.queued == len(ahead)  # nothing of the refused request was queued
        admitted = batcher.submit(items[:1], time.monotonic() + 600)  # a deadline it can keep
        engine.released.set()
        await asyncio.gather(busy, *ahead, *admitted)
        await batcher.stop()

    asyncio.run(run())


def test_an_admission_may_wait_for_room_until_its_own_limit(engine_and_items) -> None:  # type: ignore[no-untyped-def]
    engine, items = engine_and_items

    async def run() -> None:
        batcher = _batcher(engine, max_queue_items=16)
        batcher.start()
        busy = await _hold_the_engine(batcher, engine, items)
        full = batcher.submit(items[1:17], time.monotonic() + 60)
        with pytest.raises(Overloaded, match="queue full"):
            batcher.submit(items[17:18], time.monotonic() + 60)
        with pytest.raises(Overloaded, match="queue full"):  # waited, and no room came
            await batcher.admit(items[17:18], time.monotonic() + 60, wait_until=time.monotonic() + 0.2)
        waiting = asyncio.ensure_future(
            batcher.admit(items[17:18], time.monotonic() + 60, wait_until=time.monotonic() + 30)
        )
        await asyncio.sleep(0.2)
        assert not waiting.done()
        engine.released.set()  # the queue drains, and the waiting admission gets in
        admitted = await waiting
        await asyncio.gather(busy, *full, *admitted)
        await batcher.stop()

    asyncio.run(run())


class SlowEngine:
    """The real engine, each forward pass made 300 ms slower (a test-only wrapper: the tiny models
    built here run a forward pass in well under a millisecond, a large model on a CPU does not)."""

    def __init__(self, inner: OnnxRuntimeEngine) -> None:
        self.inner = inner
        self.info = inner.info
        self.passes = 0

    def infer(self, batch: TokenBatch) -> np.ndarray:
        self.passes += 1
        time.sleep(0.3)
        return self.inner.infer(batch)

    def close(self) -> None:
        self.inner.close()


def test_a_deadline_shorter_than_the_models_fastest_forward_pass_is_a_422_before_any_work(
    tiny_bundles: dict[str, Path],
) -> None:
    settings = Settings(models=str(tiny_bundles["bert"]), precision="fp32", provider="cpu", cache="off")
    engines: list[SlowEngine] = []

    def factory(bundle: Bundle, s: Settings):  # type: ignore[no-untyped-def]
        engine, selection = create_engine(bundle, s)
        engines.append(SlowEngine(engine))
        return engines[-1], selection

    with serve_app(create_app(settings, engine_factory=factory)) as url:
        wait_ready(url)
        passes = engines[-1].passes
        for route, body in (
            ("/v1/score", {"items": [{"prompt": "a", "response": "b"}]}),
            ("/get_reward", {"query": ["a b"]}),
        ):
            # Above the server-wide floor of 0.1 s, below what this model's forward pass takes.
            refused = httpx.post(url + route, json=body, headers={"X-Request-Timeout": "0.2"})
            assert refused.status_code == 422, refused.text
            message = refused.json()["error"]["message"]
            assert "a deadline of 200.0 ms is less than one forward pass of model 'default'" in message
            assert engines[-1].passes == passes  # refused before any work
            met = httpx.post(url + route, json=body, headers={"X-Request-Timeout": "5"})
            assert met.status_code == 200, met.text
            passes = engines[-1].passes
