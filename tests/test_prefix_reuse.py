"""Prefix reuse (rmserve.engines.reuse): a shared prefix is computed once, and scores do not change.

Real tiny lean bundles exported with their prefix-reuse graph, ONNX Runtime's CPU provider, the real
prefix cache; items are token ids made to share prompts the way a GRPO group and a growing solution do.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import httpx
import numpy as np
import pytest

from rmserve.bundle import PAST_FILE, load_bundle
from rmserve.config import Settings
from rmserve.engines.base import Engine, pad_batch
from rmserve.engines.prefixes import BLOCK
from rmserve.engines.reuse import PrefixReusingEngine, why_not, with_prefix_reuse
from rmserve.engines.select import create_engine
from rmserve.formatting import Formatter
from rmserve.items import StepsItem
from rmserve.kinds import kind_of
from tests.support.server import serve
from tests.support.tiny import tiny_bundle, tiny_process_bundle

TOL = 1e-5


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle("qwen2", tmp_path_factory.mktemp("reuse-qwen2"), max_length=512)


class Events:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, event: str, amount: int) -> None:
        self.counts[event] = amount if event == "bytes" else self.counts.get(event, 0) + amount


def engines(bundle_dir: Path, **settings: object) -> tuple[Engine, PrefixReusingEngine, Events]:
    bundle = load_bundle(bundle_dir)
    s = Settings(provider="cpu", precision="fp32", threads=1, streams=1, **settings)
    plain, _ = create_engine(bundle, s)
    events = Events()
    reusing, about = with_prefix_reuse(create_engine(bundle, s)[0], bundle, s, events)
    assert about["enabled"], about
    assert isinstance(reusing, PrefixReusingEngine)
    return plain, reusing, events


def group(rng: np.random.Generator, prompt: int, responses: list[int], vocab: int = 200) -> list[list[int]]:
    shared = rng.integers(5, vocab, prompt).tolist()
    return [shared + rng.integers(5, vocab, n).tolist() for n in responses]


def scores(engine: Engine, rows: list[list[int]], pad: int) -> np.ndarray:
    return engine.infer(pad_batch(rows, pad))


def test_a_group_sharing_a_prompt_scores_the_same_with_reuse_within_a_batch_and_across_batches(
    qwen2: Path,
) -> None:
    plain, reusing, events = engines(qwen2)
    pad = load_bundle(qwen2).manifest.format.pad_token_id
    rng = np.random.default_rng(0)
    members = group(rng, 150, [20, 45, 3, 70, 31, 9, 60, 12])
    others = group(rng, 90, [40, 7])  # a second prompt in the same batch
    expected = scores(plain, members + others, pad)
    # All in one batch: each prompt once for its rows.
    together = scores(reusing, members + others, pad)
    np.testing.assert_allclose(together, expected, atol=TOL, rtol=0)
    assert events.counts["reused"] >= 7 * (150 // BLOCK) * BLOCK
    # One member per batch, as one-item requests arrive: the cached prompt serves each.
    before = events.counts["reused"]
    alone = np.array([scores(reusing, [m], pad)[0] for m in members])
    np.testing.assert_allclose(alone, expected[:8], atol=TOL, rtol=0)
    assert events.counts["reused"] - before == 8 * (150 // BLOCK) * BLOCK
    assert events.counts["hit"] >= 8


def test_one_item_requests_of_a_new_group_share_the_prompt_from_the_second_member_on(qwen2: Path) -> None:
    plain, reusing, events = engines(qwen2)
    pad = load_bundle(qwen2).manifest.format.pad_token_id
    members = group(np.random.default_rng(1), 200, [30, 50, 10, 80])
    expected = scores(plain, members, pad)
    got = [scores(reusing, [m], pad)[0] for m in members]
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    # The first member is scored whole; the second keeps the prompt it shares with the first.
    assert events.counts["reused"] == 2 * (200 // BLOCK) * BLOCK


def test_a_growing_prefix_is_computed_once_per_step_and_scores_the_same(qwen2: Path) -> None:
    plain, reusing, events = engines(qwen2)
    pad = load_bundle(qwen2).manifest.format.pad_token_id
    rng = np.random.default_rng(2)
    ids = rng.integers(5, 200, 100).tolist()
    for _ in range(10):
        ids = ids + rng.integers(5, 200, 25).tolist()
        np.testing.assert_allclose(scores(reusing, [ids], pad), scores(plain, [ids], pad), atol=TOL, rtol=0)
    # From the third step on, each step starts from all but the last block or so of the step before.
    assert events.counts["reused"] > 7 * 100


def test_a_process_bundles_step_scores_are_the_same_when_each_solution_extends_the_last(
    tmp_path: Path,
) -> None:
    """PRM search: the prompt and earlier steps come from the cache, values at their step tokens too."""
    bundle_dir = tiny_process_bundle(
        "qwen2-tc2", tmp_path, sizes={"max_position_embeddings": 512}, max_length=512
    )
    bundle = load_bundle(bundle_dir)
    plain, reusing, events = engines(bundle_dir)
    kind = kind_of("prm", bundle, Formatter(bundle))
    pad = bundle.manifest.format.pad_token_id
    prompt = "A farmer has 17 sheep and buys 5 more, then sells 8. How many sheep are left? " * 2
    steps = tuple(
        f"Step {i}: the farmer now counts the sheep again and writes {i * 3} down." for i in range(8)
    )
    items = [StepsItem(prompt, steps[:k]) for k in range(1, len(steps) + 1)]
    for item in items:
        (encoded,) = kind.encode([item])
        batch = pad_batch([encoded.ids], pad)
        alone, reused = kind.read(plain.infer(batch)[0], encoded), kind.read(reusing.infer(batch)[0], encoded)
        assert len(reused) == len(item.steps)
        np.testing.assert_allclose(reused, alone, atol=TOL, rtol=0)
    assert events.counts["reused"] > 0
    # Two growing solutions in one batch, each past its cached prefix.
    encoded = kind.encode([StepsItem(prompt, steps[:3] + ("Step x: done.",)), items[-1]])
    batch = pad_batch([e.ids for e in encoded], pad)
    for row_plain, row_reused, e in zip(plain.infer(batch), reusing.infer(batch), encoded, strict=True):
        np.testing.assert_allclose(kind.read(row_reused, e), kind.read(row_plain, e), atol=TOL, rtol=0)


def test_the_cache_stays_within_its_budget_and_evicts_the_least_recently_used(qwen2: Path) -> None:
    plain, reusing, events = engines(qwen2, prefix_cache_mb=1)
    pad = load_bundle(qwen2).manifest.format.pad_token_id
    rng = np.random.default_rng(3)
    for _ in range(30):  # far more distinct prompts than a megabyte holds
        members = group(rng, 300, [10, 20])
        np.testing.assert_allclose(
            scores(reusing, members, pad), scores(plain, members, pad), atol=TOL, rtol=0
        )
        assert reusing.cache.stats().bytes <= 1 << 20
    assert events.counts["evicted:budget"] > 0
    assert events.counts["bytes"] == reusing.cache.stats().bytes


def test_bundles_that_cannot_reuse_say_why(
    tiny_bundles: dict[str, Path], qwen2: Path, tmp_path: Path
) -> None:
    settings = Settings(provider="cpu", precision="fp32")
    bert = load_bundle(tiny_bundles["bert"])
    assert "encoder" in (why_not(bert, create_engine(bert, settings)[0].info, settings) or "")
    old = tiny_bundle("llama", tmp_path / "old", past_graph=False)
    assert not (old / PAST_FILE).exists()
    llama = load_bundle(old)
    assert "no prefix-reuse graph" in (why_not(llama, create_engine(llama, settings)[0].info, settings) or "")
    q = load_bundle(qwen2)
    off = Settings(provider="cpu", precision="fp32", prefix_reuse=False)
    assert "switched off" in (why_not(q, create_engine(q, off)[0].info, off) or "")
    ov = Settings(provider="openvino", precision="fp32")
    assert "openvino" in (why_not(q, create_engine(q, ov)[0].info, ov) or "")


def test_v1_models_says_whether_a_bundle_reuses_prefixes(
    qwen2: Path, tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    env = {
        "RMSERVE_MODELS": f"q={qwen2},b={tiny_bundles['bert']}",
        "RMSERVE_PROVIDER": "cpu",
        "RMSERVE_PRECISION": "fp32",
        "RMSERVE_CACHE": "off",
        "RMSERVE_PREFIX_CACHE_MB": "8",
    }
    prompt = "Tell me about the history of bread and how it is made in villages. " * 6
    with serve(env, tmp_path) as server:
        listed = {m["id"]: m for m in httpx.get(server.url + "/v1/models", timeout=30).json()["data"]}
        assert listed["q"]["prefix_reuse"]["enabled"] is True
        assert listed["q"]["prefix_reuse"]["cache_bytes"] == 8 << 20
        assert listed["b"]["prefix_reuse"] == {
            "enabled": False,
            "reason": listed["b"]["prefix_reuse"]["reason"],
        }
        assert "encoder" in listed["b"]["prefix_reuse"]["reason"]
        for response in ("Knead it.", "Bake it long and slow in a hot oven.", "Ask a baker."):
            r = httpx.post(
                server.url + "/v1/score",
                json={"model": "q", "items": [{"prompt": prompt, "response": response}]},
                timeout=60,
            )
            assert r.status_code == 200, r.text
        metrics = httpx.get(server.url + "/metrics", timeout=30).text
    reused = [
        line
        for line in metrics.splitlines()
        if line.startswith('rmserve_prefix_tokens_reused_total{model="q"}')
    ]
    assert reused and float(reused[0].split()[-1]) > 0


def test_the_ray_router_reads_the_key_from_http_and_handle_requests_and_moves_few_keys_on_scale_out() -> None:
    from types import SimpleNamespace
    from typing import Any, cast

    from rmserve.ray.routing import prefix_key, rank

    http = SimpleNamespace(asgi_scope={"type": "http", "headers": [(b"x-prefix-key", b"abc")]})
    assert prefix_key([http]) == "abc"
    assert prefix_key([pickle.dumps(http)]) == "abc"  # as Ray's HTTP proxy sends it
    assert prefix_key(["POST", "/v1/score", [("X-Prefix-Key", "def")], b"{}"]) == "def"
    assert prefix_key([SimpleNamespace(asgi_scope={"headers": []})]) is None
    # Stand-ins for Ray's RunningReplica: ``rank`` reads only replica_id.unique_id.
    replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=f"r{i}")) for i in range(4)]
    keys = [f"key{i}" for i in range(400)]
    before = {k: rank(k, cast(Any, replicas))[0][0] for k in keys}
    after = {
        k: rank(k, cast(Any, replicas + [SimpleNamespace(replica_id=SimpleNamespace(unique_id="r4"))]))[0][0]
        for k in keys
    }
    moved = [k for k in keys if before[k] is not after[k]]
    assert all(after[k].replica_id.unique_id == "r4" for k in moved)  # only to the new replica
    assert 40 < len(moved) < 120  # about a fifth of the keys
    assert len({r.replica_id.unique_id for r in before.values()}) == 4


def test_the_batcher_takes_waiting_items_that_share_a_prompt_into_one_batch(qwen2: Path) -> None:
    """One-item requests of a group, waiting together, are scored in one pass over their prompt."""
    import asyncio
    import time

    from rmserve.batching import Batcher, BatchPolicy
    from rmserve.formatting import Encoded
    from rmserve.metrics import Metrics

    plain, reusing, events = engines(qwen2)
    pad = load_bundle(qwen2).manifest.format.pad_token_id
    members = group(np.random.default_rng(4), 96, [12, 20, 7, 25, 16, 9])
    others = group(np.random.default_rng(5), 40, [30])  # shares nothing with the group
    expected = scores(plain, members + others, pad)

    async def run() -> tuple[list[float], Metrics]:
        metrics = Metrics()
        policy = BatchPolicy(max_batch_tokens=128, max_wait_s=0.0, max_queue_items=64)
        batcher = Batcher("q", reusing, policy, pad_id=pad, with_type_ids=False, metrics=metrics)
        batcher.start()  # its loop first runs at the next await: by then every item waits
        futures = [
            batcher.submit([Encoded(tuple(ids), None, False)], time.monotonic() + 60)[0]
            for ids in members + others
        ]
        values = await asyncio.gather(*futures)
        await batcher.stop()
        return list(values), metrics

    values, metrics = asyncio.run(run())
    np.testing.assert_allclose(values, expected, atol=TOL, rtol=0)
    sizes = metrics.batch_size.collect()[0].samples
    count = next(s.value for s in sizes if s.name.endswith("_count"))
    assert count == 2  # the group in one batch (96 + 6 suffixes fit 4 budgets), the other item alone
    assert events.counts["reused"] == 6 * (96 // BLOCK) * BLOCK
