"""The score cache: real Redis (single server, Sentinel, Cluster), real server processes over HTTP.

Every test writes under a key prefix of its own and deletes it afterwards. Run alone with
``pytest -x -q tests/test_cache.py``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from rmserve.cache.base import CacheUnavailable
from rmserve.cache.breaker import CircuitBreaker
from rmserve.cache.keys import encode_item, item_key
from rmserve.cache.memory import MemoryCache
from rmserve.cache.redis import RedisCache, RedisOptions
from rmserve.cache.redis_url import parse_redis_url
from rmserve.items import ChatItem, Item, Message, PairItem, TextItem
from tests.support.redis import (
    RedisClusterProcesses,
    RedisProcess,
    delete_prefix,
    shared_redis_url,
    unique_prefix,
)
from tests.support.server import ServerProcess, serve, wait_ready

# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url, how = shared_redis_url(tmp_path_factory.mktemp("redis"))
    if url is None:
        pytest.skip(how)
    return url


@pytest.fixture(scope="module")
def prefix(redis_url: str) -> Iterator[str]:
    name = unique_prefix()
    yield name
    delete_prefix(redis_url, name)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.tiny import tiny_bundle

    return tiny_bundle("bert", tmp_path_factory.mktemp("bert-seed0"))


@pytest.fixture(scope="module")
def next_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same architecture trained "again" (another seed): a new bundle version."""
    from tests.support.tiny import tiny_bundle

    return tiny_bundle("bert", tmp_path_factory.mktemp("bert-seed1"), seed=1)


def _start_all(stack: ExitStack, tmp: Path, *envs: dict[str, str]) -> list[ServerProcess]:
    """Start servers side by side (their start-up overlaps), then wait for each."""
    servers = [stack.enter_context(serve(env, tmp, ready=False)) for env in envs]
    for server in servers:
        try:
            wait_ready(server.url, server.process)
        except Exception as exc:
            raise RuntimeError(f"{exc}\n--- server log ---\n{server.log()}") from None
    return servers


@pytest.fixture(scope="module")
def replicas(
    bundle: Path, next_bundle: Path, redis_url: str, prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two replicas sharing one Redis; the second also serves the next bundle version as "next"."""
    # The backend and precision are part of the key, and `auto` measures them per process: on a busy
    # machine two replicas could pick differently and rightly share nothing. Pin them.
    common = {
        "RMSERVE_REDIS_URL": redis_url,
        "RMSERVE_CACHE_PREFIX": prefix,
        "RMSERVE_PROVIDER": "cpu",
        "RMSERVE_PRECISION": "fp32",
    }
    with ExitStack() as stack:
        first, second = _start_all(
            stack,
            tmp_path_factory.mktemp("replicas"),
            {**common, "RMSERVE_MODELS": str(bundle)},
            {**common, "RMSERVE_MODELS": f"default={bundle},next={next_bundle}"},
        )
        yield first, second


def fresh_items() -> list[dict[str, Any]]:
    """Items never scored before, one of each shape."""
    tag = uuid.uuid4().hex[:8]
    return [
        {"prompt": f"What is {tag}?", "response": f"{tag} is a word."},
        {"prompt": [{"role": "user", "content": f"Say {tag}"}], "response": tag},
        {"messages": [{"role": "user", "content": f"hi {tag}"}, {"role": "assistant", "content": "hello"}]},
        {"text": f"Human: {tag}\n\nAssistant: fine"},
    ]


def score(server: ServerProcess, items: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    resp = httpx.post(server.url + "/v1/score", json={"items": items, **extra}, timeout=30)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def wait_written(server: ServerProcess, timeout: float = 10.0) -> None:
    """Until the server's write-behind buffer has reached Redis."""
    deadline = time.monotonic() + timeout
    while httpx.get(server.url + "/info").json()["cache"]["buffered_writes"]:
        assert time.monotonic() < deadline, "cache writes never reached Redis"
        time.sleep(0.02)


# -- over HTTP, shared Redis ---------------------------------------------------------------------


def test_a_repeated_request_is_all_hits_with_identical_scores(replicas: tuple[ServerProcess, ...]) -> None:
    server = replicas[0]
    items = fresh_items()
    hits_before = server.metric("rmserve_cache_lookups_total", 'result="hit"')
    first = score(server, items)
    again = score(server, items)
    assert first["usage"]["cache_hits"] == 0
    assert again["usage"]["cache_hits"] == len(items)
    assert again["scores"] == first["scores"]  # bit for bit: float64 in Redis holds the float32 exactly
    assert again["usage"]["tokens"] == first["usage"]["tokens"]
    assert server.metric("rmserve_cache_lookups_total", 'result="hit"') - hits_before == len(items)
    info = httpx.get(server.url + "/info").json()["cache"]
    assert info["backend"] == "redis" and info["mode"] == "single" and info["state"] == "closed"
    assert info["parser"] == "hiredis"


def test_another_replica_gets_hits_for_what_the_first_wrote(replicas: tuple[ServerProcess, ...]) -> None:
    first, second = replicas
    items = fresh_items()
    written = score(first, items)
    wait_written(first)
    scored_before = second.metric("rmserve_items_scored_total")
    read = score(second, items)
    assert read["usage"]["cache_hits"] == len(items)
    assert read["scores"] == written["scores"]
    assert second.metric("rmserve_items_scored_total") == scored_before  # no inference on the second


def test_a_new_bundle_version_misses(replicas: tuple[ServerProcess, ...]) -> None:
    first, second = replicas
    items = fresh_items()
    old = score(first, items)
    wait_written(first)
    new = score(second, items, model="next")
    assert new["model_version"] != old["model_version"]
    assert new["usage"]["cache_hits"] == 0
    assert new["scores"] != old["scores"]
    assert score(second, items)["usage"]["cache_hits"] == len(
        items
    )  # the old version's entries still serve it


def test_fifty_concurrent_requests_for_one_new_item_run_one_inference(
    replicas: tuple[ServerProcess, ...],
) -> None:
    server = replicas[0]
    item = fresh_items()[:1]
    before = server.metric("rmserve_items_scored_total")

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client:
            return list(
                await asyncio.gather(*(client.post("/v1/score", json={"items": item}) for _ in range(50)))
            )

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 50
    assert len({r.json()["scores"][0] for r in responses}) == 1
    assert server.metric("rmserve_items_scored_total") - before == 1


def test_entries_expire_after_the_ttl(bundle: Path, redis_url: str, tmp_path: Path) -> None:
    ttl_prefix = unique_prefix()
    env = {
        "RMSERVE_MODELS": str(bundle),
        "RMSERVE_REDIS_URL": redis_url,
        "RMSERVE_CACHE_PREFIX": ttl_prefix,
        "RMSERVE_CACHE_TTL_S": "2",  # long enough that a loaded machine reads them back in time
    }
    client = redis.Redis.from_url(redis_url)
    try:
        with serve(env, tmp_path) as server:
            items = fresh_items()
            assert score(server, items)["usage"]["cache_hits"] == 0
            wait_written(server)
            names = list(client.scan_iter(match=ttl_prefix + "*"))
            assert len(names) == len(items)
            ttls = [client.pttl(n) for n in names]
            assert all(0 < t <= 2000 for t in ttls), ttls  # written with their TTL
            assert score(server, items)["usage"]["cache_hits"] == len(items)
            time.sleep(2.1)
            assert score(server, items)["usage"]["cache_hits"] == 0
    finally:
        delete_prefix(redis_url, ttl_prefix)
        client.close()


# -- outage: a private redis-server killed in the middle of a load ---------------------------------


def test_redis_outage_under_load_fails_no_request_and_the_cache_comes_back(
    bundle: Path, tmp_path: Path
) -> None:
    own = RedisProcess(tmp_path / "redis")  # not started yet: the server must start without it
    env = {
        "RMSERVE_MODELS": str(bundle),
        "RMSERVE_REDIS_URL": own.url,
        "RMSERVE_CACHE_BREAKER_FAILURES": "3",
        "RMSERVE_CACHE_BREAKER_COOLDOWN_S": "0.3",
    }
    with serve(env, tmp_path) as server, ExitStack() as stack:
        stack.callback(own.stop)
        # Ready and serving with Redis down at start-up; the lookups count as errors.
        errors = server.metric("rmserve_cache_lookups_total", 'result="error"')
        assert score(server, fresh_items())["usage"]["cache_hits"] == 0
        assert server.metric("rmserve_cache_lookups_total", 'result="error"') > errors

        own.start()
        assert_hits_return(server, own)

        # Load: 16 clients, repeated and new items; Redis killed after 1 s, back after 1 s more.
        pool = [fresh_items() for _ in range(8)]
        codes: list[int] = []
        errors = server.metric("rmserve_cache_lookups_total", 'result="error"')

        async def load(stop: float) -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                n = 0
                while time.monotonic() < stop:
                    items = pool[n % len(pool)] if n % 3 else fresh_items()
                    n += 1
                    try:
                        codes.append((await client.post("/v1/score", json={"items": items})).status_code)
                    except httpx.HTTPError:
                        codes.append(-1)

        async def outage() -> None:
            stop = time.monotonic() + 3.0
            clients = [asyncio.create_task(load(stop)) for _ in range(16)]
            await asyncio.sleep(1.0)
            await asyncio.to_thread(own.stop)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(own.start)
            await asyncio.gather(*clients)

        asyncio.run(outage())
        assert codes and set(codes) == {200}, (
            f"{sum(c != 200 for c in codes)} of {len(codes)} requests failed"
        )
        assert server.metric("rmserve_cache_lookups_total", 'result="error"') > errors
        assert httpx.get(server.url + "/info").json()["cache"]["breaker"]["opened"] >= 1

        # Redis is back on the same port: hits return, same process, no restart.
        assert_hits_return(server, own)
        assert server.process.poll() is None


def assert_hits_return(server: ServerProcess, own: RedisProcess, timeout: float = 10.0) -> None:
    """New items, written to this Redis and read back as hits, once the breaker lets calls through."""
    deadline = time.monotonic() + timeout
    while True:
        items = fresh_items()
        score(server, items)
        wait_written(server)
        if score(server, items)["usage"]["cache_hits"] == len(items) and _keys(own.url):
            assert httpx.get(server.url + "/info").json()["cache"]["state"] == "closed"
            return
        assert time.monotonic() < deadline, "the cache never worked again after Redis came back"
        time.sleep(0.1)


def _keys(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.dbsize())
    finally:
        client.close()


# -- the single-flight, in process ---------------------------------------------------------------


async def test_a_leader_that_goes_away_does_not_cancel_work_others_wait_for(bundle: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from rmserve.config import Settings
    from rmserve.loading import load_runtime
    from rmserve.metrics import Metrics
    from rmserve.scoring import Scorer

    metrics = Metrics()
    settings = Settings(models=str(bundle), cache="memory")
    runtime = await load_runtime("default", bundle, settings, metrics)
    cache = MemoryCache(100)
    scorer = Scorer(
        {"default": runtime},
        cache=cache,
        metrics=metrics,
        tokenize_pool=ThreadPoolExecutor(2),
        max_tokens_per_request=100_000,
    )
    try:
        item: list[Item] = [PairItem("a question nobody asked", "an answer")]
        deadline = time.monotonic() + 600

        leader = asyncio.create_task(scorer.score(None, item, strict=False, deadline=deadline))
        await asyncio.sleep(0)  # the leader looked up the cache and registered its flight
        await asyncio.sleep(0)
        followers = [
            asyncio.create_task(scorer.score(None, item, strict=False, deadline=deadline)) for _ in range(3)
        ]
        await asyncio.sleep(0)
        leader.cancel()  # its client went away
        results = await asyncio.gather(*followers)
        assert leader.cancelled()
        assert len({r.scores[0] for r in results}) == 1
        assert metrics.registry.get_sample_value("rmserve_items_scored_total", {"model": "default"}) == 1
        # The work the leader started was written back although nobody who started it stayed.
        assert (await scorer.score(None, item, strict=False, deadline=deadline)).cache_hits == 1
    finally:
        await runtime.batcher.stop()
        runtime.engine.close()


# -- keys ----------------------------------------------------------------------------------------

_text = st.text(max_size=12)
_messages = st.lists(
    st.builds(Message, role=st.sampled_from(["user", "assistant", "system", ""]), content=_text), max_size=3
).map(tuple)
_items = st.one_of(
    st.builds(PairItem, prompt=st.one_of(_text, _messages), response=_text),
    st.builds(ChatItem, messages=_messages),
    st.builds(TextItem, text=_text),
)


@settings(max_examples=400, deadline=None)
@given(_items, _items)
def test_different_items_never_share_a_key(a: Item, b: Item) -> None:
    ns = b"\x00" * 32
    assert (encode_item(a) == encode_item(b)) == (a == b)
    assert (item_key(ns, a) == item_key(ns, b)) == (a == b)


def test_boundaries_and_shapes_are_part_of_the_key() -> None:
    ns = b"\x01" * 32
    confusable: list[Item] = [
        PairItem("ab", "c"),
        PairItem("a", "bc"),
        PairItem("", "abc"),
        TextItem("abc"),
        TextItem("ab"),
        PairItem((Message("user", "ab"),), "c"),
        PairItem((Message("user", "a"), Message("user", "b")), "c"),
        ChatItem((Message("user", "ab"), Message("assistant", "c"))),
        ChatItem((Message("user", "a"), Message("bassistant", "c"))),
    ]
    keys = {item_key(ns, i) for i in confusable}
    assert len(keys) == len(set(confusable))
    assert item_key(ns, TextItem("x")) != item_key(
        b"\x02" * 32, TextItem("x")
    )  # another version, another key


# -- the in-process LRU --------------------------------------------------------------------------


async def test_the_memory_cache_evicts_the_least_recently_used_at_its_bound() -> None:
    cache = MemoryCache(3)
    cache.put_many({"a": b"1", "b": b"2", "c": b"3"})
    assert await cache.get_many(["a"]) == [b"1"]  # a is now the most recent
    cache.put_many({"d": b"4"})
    assert await cache.get_many(["a", "b", "c", "d"]) == [b"1", None, b"3", b"4"]
    cache.put_many({"e": b"5", "f": b"6"})
    assert cache.state()["items"] == 3
    assert await cache.get_many(["a", "c", "d", "e", "f"]) == [None, None, b"4", b"5", b"6"]


# -- the circuit breaker -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_breaker_opens_after_consecutive_failures_and_probes_once_when_cooled_down() -> None:
    clock = Clock()
    breaker = CircuitBreaker(3, 5.0, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    breaker.success()  # not consecutive: the count starts again
    for _ in range(3):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    clock.now += 4.9
    assert not breaker.allow()
    clock.now += 0.2
    assert breaker.state == "half-open"
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one
    breaker.failure()  # probe failed: open again for a full cool-down
    assert breaker.state == "open" and not breaker.allow()
    clock.now += 5.0
    assert breaker.allow()
    breaker.release()  # a probe that was cancelled frees the slot
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow() and breaker.opened == 2


def test_a_lost_probe_expires() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 1.0, clock=clock)
    breaker.failure()
    clock.now += 1.0
    assert breaker.allow() and not breaker.allow()
    clock.now += 1.0  # the probe's caller never reported
    assert breaker.allow()


# -- RedisCache directly: breaker, bounded writes, Sentinel, Cluster ---------------------------------


async def test_a_dead_redis_opens_the_circuit_and_lookups_stop_calling_it() -> None:
    from tests.support.server import free_port

    cache = RedisCache.from_url(
        f"redis://:s3cret@127.0.0.1:{free_port()}/0",
        RedisOptions(ttl_s=60, breaker_failures=2, breaker_cooldown_s=60),
    )
    try:
        for _ in range(4):
            with pytest.raises(CacheUnavailable):
                await cache.get_many(["k"])
        state = cache.state()
        assert state["state"] == "open"
        assert state["read_errors"] == 2 and state["reads_skipped"] == 2  # the last two never called Redis
        assert "s3cret" not in str(state) and state["url"].startswith("redis://:***@")
    finally:
        await cache.close()


async def test_writes_beyond_the_buffer_are_dropped_and_counted(redis_url: str) -> None:
    name = unique_prefix()
    cache = RedisCache.from_url(redis_url, RedisOptions(ttl_s=60, prefix=name, write_buffer_items=10))
    try:
        cache.put_many({f"a{i}": b"v" for i in range(8)})
        cache.put_many({f"b{i}": b"v" for i in range(5)})  # the writer has not run yet: no room
        assert cache.state()["dropped_writes"] == 5
        assert await cache.get_many(["a0", "b0"]) == [b"v", None]
        await cache.close()  # flushes what was buffered
        assert cache.state()["writes"] == 8
        assert delete_prefix(redis_url, name) == 8
    finally:
        delete_prefix(redis_url, name)


async def test_each_entry_is_written_with_its_ttl_jittered_down_by_up_to_10_percent(redis_url: str) -> None:
    name = unique_prefix()
    cache = RedisCache.from_url(redis_url, RedisOptions(ttl_s=100, prefix=name))
    client = redis.Redis.from_url(redis_url)
    try:
        cache.put_many({f"k{i}": b"v" for i in range(50)})
        await cache.close()
        ttls = [client.pttl(f"{name}k{i}") for i in range(50)]
        assert all(89_000 <= t <= 100_000 for t in ttls), ttls
        assert max(ttls) - min(ttls) > 2_000  # spread, so entries written together do not expire together
    finally:
        delete_prefix(redis_url, name)
        client.close()


async def test_sentinel_url_reaches_the_master(tmp_path: Path) -> None:
    with (
        RedisProcess(tmp_path / "master") as master,
        RedisProcess(tmp_path / "sentinel", sentinel_of=master.port) as s,
    ):
        cache = RedisCache.from_url(f"redis+sentinel://127.0.0.1:{s.port}/mymaster/3", RedisOptions(ttl_s=60))
        try:
            assert cache.state()["mode"] == "sentinel"
            cache.put_many({"k1": b"one", "k2": b"two"})
            await cache.close()
            direct = redis.Redis(port=master.port, db=3)
            assert direct.mget(["rmserve:k1", "rmserve:k2"]) == [b"one", b"two"]
            direct.close()
            cache = RedisCache.from_url(
                f"redis+sentinel://127.0.0.1:{s.port}/mymaster/3", RedisOptions(ttl_s=60)
            )
            assert await cache.get_many(["k2", "nope", "k1"]) == [b"two", None, b"one"]
        finally:
            await cache.close()


async def test_cluster_reads_keys_spread_over_every_node_in_one_lookup(tmp_path: Path) -> None:
    from redis.crc import key_slot

    with RedisClusterProcesses(tmp_path / "cluster") as cluster:
        keys = [item_key(b"\x03" * 32, TextItem(f"item {i}")) for i in range(60)]
        names = [f"rmserve:{k}".encode() for k in keys]
        assert len({key_slot(n) for n in names}) > 50  # digests spread over slots: MGET alone would fail
        cache = RedisCache.from_url(cluster.url, RedisOptions(ttl_s=60))
        try:
            cache.put_many({k: k.encode()[:8] for k in keys})
            await cache.close()
            per_node = [redis.Redis(port=n.port).dbsize() for n in cluster.nodes]
            assert all(count > 0 for count in per_node) and sum(per_node) == len(keys)
            cache = RedisCache.from_url(cluster.url, RedisOptions(ttl_s=60))
            got = await cache.get_many([*keys, "absent"])
            assert got == [k.encode()[:8] for k in keys] + [None]
            assert cache.state()["read_errors"] == 0
        finally:
            await cache.close()


# -- URLs ----------------------------------------------------------------------------------------


def test_redis_urls_of_every_deployment_shape_parse() -> None:
    single = parse_redis_url("rediss://user:pw@cache.internal:6380/2")
    assert single.mode == "single"
    sentinel = parse_redis_url("redis+sentinel://:pw@s1:26379,s2,[::1]:26380/mymaster/4?sentinel_password=sp")
    assert sentinel.mode == "sentinel" and sentinel.service_name == "mymaster" and sentinel.db == 4
    assert sentinel.hosts == (("s1", 26379), ("s2", 26379), ("::1", 26380))
    assert sentinel.password == "pw" and sentinel.sentinel_password == "sp"
    cluster = parse_redis_url("rediss+cluster://n1:7000,n2:7001")
    assert cluster.mode == "cluster" and cluster.tls and cluster.hosts == (("n1", 7000), ("n2", 7001))
    for bad in (
        "memcached://x",
        "redis+sentinel://s1:26379",
        "redis+cluster://n1:7000/3",
        "redis+cluster://n1:x",
        "redis+sentinel://s1/m/x",
        "redis://",
    ):
        with pytest.raises(ValueError):
            parse_redis_url(bad)


def test_settings_refuse_a_bad_redis_url_at_start_up() -> None:
    from pydantic import ValidationError

    from rmserve.config import Settings

    with pytest.raises(ValidationError, match="redis"):
        Settings(redis_url="redis+sentinel://only-hosts:26379")
    shown = Settings(redis_url="redis+sentinel://:pw@s1/mymaster?sentinel_password=x").public()["redis_url"]
    assert "pw" not in shown.replace("password", "") and shown.count("***") == 2


def test_a_full_redis_shows_in_a_metric_and_one_warning(bundle: Path, tmp_path: Path) -> None:
    env = {"RMSERVE_MODELS": str(bundle), "RMSERVE_LOG_LEVEL": "warning"}
    with RedisProcess(tmp_path / "redis", extra=("--maxmemory-policy", "noeviction")) as own:
        redis.Redis.from_url(own.url).config_set("maxmemory", 1)  # full from the first write
        with serve({**env, "RMSERVE_REDIS_URL": own.url}, tmp_path) as server:
            for _ in range(3):
                assert len(score(server, fresh_items())["scores"]) > 0  # scoring goes on
            deadline = time.monotonic() + 600  # a ceiling for a busy machine, not a speed
            while server.metric("rmserve_cache_dropped_writes_total", 'reason="redis_full"') < 3:
                assert time.monotonic() < deadline, "the dropped writes were never counted"
                time.sleep(0.05)
            assert server.metric("rmserve_cache_dropped_writes_total", 'reason="error"') == 0
    assert server.log().count("redis is full (maxmemory reached)") == 1  # rate-limited
