"""rmserve on Ray Serve, on a real local Ray cluster: ``rmserve ray-serve`` and the default bundle.

The cluster (``tests.support.ray``) is started once for the module; the first test runs
``rmserve ray-serve`` without an address, on a cluster of its own, before that one starts. Every
test skips, saying why, where Ray is not installed or its cluster does not start.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from rmserve.client import ModelNotFoundError, RewardClient
from tests.support.server import REPO, ServerProcess, free_port, serve

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")
from ray import serve as ray_serve_api  # noqa: E402

from tests.support.ray import RayCluster, ray_head, ray_serve, ray_serve_process, stop  # noqa: E402

pytestmark = pytest.mark.slow

FP32 = {"RMSERVE_PRECISION": "fp32"}
REPLICA = ["--num-cpus", "0.25"]  # two CPUs, shared: replicas reserve a quarter each
ITEMS = [
    {"prompt": "How do I boil an egg?", "response": "Put it in boiling water for 8 minutes."},
    {"prompt": "How do I boil an egg?", "response": "No idea, figure it out."},
    {
        "messages": [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello, how can I help?"},
        ]
    },
    {"text": "Human: What is 2 + 2?\n\nAssistant: 4."},
]
QUERIES = ["Human: Name a colour.\n\nAssistant: Blue.", "Human: Name a colour.\n\nAssistant: I won't."]


def _long_items(tag: str, n: int) -> list[dict[str, str]]:
    """Distinct items of some length: a few seconds of work for a quarter-CPU replica."""
    return [
        {"prompt": f"{tag} question {i}: " + "why is that so? " * 40, "response": "because " * 80}
        for i in range(n)
    ]


def _replicas(app: str) -> int:
    """RUNNING replicas of the application's deployment, as Serve reports them."""
    status = ray_serve_api.status().applications.get(app)
    if status is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in status.deployments.values())


def _wait(condition: Any, timeout: float, what: str) -> None:
    """Until ``condition()`` holds; ``timeout`` is a ceiling for a stuck test on a busy machine, not a
    speed the test expects."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.25)


def _closed(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) != 0


# -- without a cluster: what the settings turn into -------------------------------------------------


def test_builder_arguments_go_to_their_settings_and_unknown_or_serve_owned_ones_are_refused() -> None:
    from rmserve.ray.options import split_builder_args

    settings, ray_settings = split_builder_args({"precision": "fp32", "replicas": "2", "num_cpus": "0.5"})
    assert settings.precision == "fp32" and ray_settings.replicas == 2 and ray_settings.num_cpus == 0.5
    with pytest.raises(ValueError, match="replica: not a setting of rmserve"):
        split_builder_args({"replica": "2"})
    with pytest.raises(ValueError, match=r"port: not an argument of rmserve.ray:app; use .*serve run --port"):
        split_builder_args({"port": "9000"})


def test_server_and_ray_settings_share_no_name_and_replicas_use_the_cpus_they_reserve() -> None:
    from rmserve.config import Settings
    from rmserve.ray.options import RaySettings

    assert not set(Settings.model_fields) & set(RaySettings.model_fields)
    replica = RaySettings(num_cpus=2.5).replica_settings(Settings())
    assert replica.threads == 2
    assert RaySettings(num_cpus=0.25).replica_settings(Settings(threads=3)).threads == 3


def test_max_replicas_turns_on_autoscaling_on_items_which_ray_serve_accepts() -> None:
    from ray.serve.config import AutoscalingConfig

    from rmserve.config import Settings
    from rmserve.ray.deployment import RMServeReplica
    from rmserve.ray.options import ITEMS_METRIC, RaySettings

    fixed = RaySettings(replicas=3).deployment_options(Settings(drain_grace_s=7))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["graceful_shutdown_timeout_s"] == 7
    options = RaySettings(min_replicas=1, max_replicas=4, target_items_per_replica=32).deployment_options(
        Settings()
    )
    config = AutoscalingConfig(**options["autoscaling_config"])
    assert (config.min_replicas, config.max_replicas) == (1, 4)
    assert config.policy.policy_kwargs == {"metric": ITEMS_METRIC, "target_items_per_replica": 32}
    deployment = ray_serve_api.deployment(**options)(RMServeReplica)  # Ray validates every option
    assert deployment.name == "RMServe"


def test_the_autoscaling_policy_counts_items_not_requests() -> None:
    from types import SimpleNamespace

    from rmserve.ray.autoscaling import QueuedItemsPolicy

    policy = QueuedItemsPolicy(metric="items", target_items_per_replica=64)

    # The context's attributes as Ray's AutoscalingContext names them (ray/serve/config.py).
    def ctx(items: list[float], queued: float = 0.0, replicas: int = 2) -> Any:
        metrics = {"items": {f"r{i}": n for i, n in enumerate(items)}}
        return SimpleNamespace(
            current_num_replicas=replicas,
            target_num_replicas=replicas,
            aggregated_metrics=metrics,
            total_queued_requests=queued,
        )

    # One request of 2,000 items is the load of 2,000 one-item requests.
    assert policy(ctx([2000.0, 0.0]))[0] == pytest.approx(2000 / 64)
    assert policy(ctx([0.0, 0.0]))[0] == 0
    assert policy(ctx([32.0, 32.0], queued=64.0))[0] == pytest.approx(2.0)
    assert policy(ctx([], replicas=0))[0] == 0


def test_the_handle_client_imports_nothing_of_the_server() -> None:
    code = (
        "import sys, rmserve.ray.handle; "
        "print(sorted(m for m in ('onnxruntime', 'openvino', 'tokenizers', 'pydantic_settings', "
        "'rmserve.app', 'rmserve.config', 'rmserve.scoring') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_ray_serve_without_ray_names_the_ray_extra_before_starting_anything(tmp_path: Path) -> None:
    # Ray hidden from the import system (a None entry in sys.modules), as in an install without it.
    code = (
        "import sys; sys.modules['ray'] = None; from rmserve.cli import main; sys.exit(main(['ray-serve']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert (
        lines[0]
        == "rmserve ray-serve: needs the ray extra (missing module 'ray'); install it as rmserve came:"
    )
    assert "  from a clone of its repository:  pip install '.[ray]'" in lines


def test_docs_ray_lists_every_ray_setting_with_its_flag_and_default() -> None:
    from rmserve.config import default_text
    from rmserve.ray.options import RaySettings

    rows = {}
    for line in (REPO / "docs" / "ray.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `RMSERVE_RAY_"):
            rows[cells[0]] = cells
    assert set(rows) == {f"`RMSERVE_RAY_{name.upper()}`" for name in RaySettings.model_fields}
    for name, field in RaySettings.model_fields.items():
        _, flag, default, meaning = rows[f"`RMSERVE_RAY_{name.upper()}`"]
        assert flag == f"`--{name.replace('_', '-')}`" and default == f"`{default_text(field.default)}`", name
        assert meaning, name


# -- rmserve ray-serve on a cluster of its own ------------------------------------------------------


def test_ray_serve_alone_starts_its_own_cluster_and_on_sigterm_drains_accepted_work_and_exits_0(
    tmp_path: Path,
) -> None:
    # A home that never ran Ray, as on a fresh machine: no ~/.ray/auth_token for the token mode. Ray's
    # temp dir of its own (short: Ray's socket paths must fit 107 bytes), so its ray_current_cluster
    # is this test's, whatever else runs Ray on this machine.
    home = tmp_path / "home"
    home.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    pointer = ray_tmp / "ray" / "ray_current_cluster"
    env = {"HOME": str(home), "RAY_TMPDIR": str(ray_tmp)}
    server, proc = ray_serve_process(
        [*REPLICA, "--replicas", "1"],
        # A drain grace no busy machine outlasts: the test is that accepted work finishes, not how fast.
        {**FP32, "RMSERVE_CACHE": "off", "RMSERVE_DRAIN_GRACE_S": "600", **env},
        tmp_path,
        port=free_port(),
        address=None,
    )
    try:
        from tests.support.server import wait_ready

        try:
            wait_ready(server.url, proc, 600)
        except Exception as exc:
            _skip_unless_ray_starts(tmp_path, exc)
            raise AssertionError(server.log()[-4000:]) from exc
        found = re.search(r"started a local Ray cluster at (\S+);", server.log())
        assert found, server.log()
        assert pointer.is_file(), "Ray's pointer to the cluster, which the test then sees removed"
        answers: list[httpx.Response] = []
        senders = [
            threading.Thread(
                target=lambda k=k: answers.append(
                    httpx.post(
                        server.url + "/v1/score", json={"items": _long_items(f"drain{k}", 24)}, timeout=600
                    )
                )
            )
            for k in range(3)
        ]
        for sender in senders:
            sender.start()
        # SIGTERM once the replica holds accepted work (its queue, through the proxy: one replica).
        _wait(lambda: server.metric("rmserve_queue_depth") > 0, 600, "items queued at the replica")
        proc.send_signal(signal.SIGTERM)
        for sender in senders:
            sender.join(timeout=600)
        assert proc.wait(timeout=600) == 0, server.log()
    finally:
        stop(proc)
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    assert all(len(a.json()["scores"]) == 24 for a in answers)
    log = server.log()
    assert "rmserve: draining" in log
    assert "rmserve: stopped: the application drained; the local Ray cluster stopped" in log
    # Ray's lines about joining "an existing cluster" and options "not applied" are not its words.
    assert "existing" not in log and "will not be applied" not in log, log
    assert re.search(r"replica logs: .*on this one \S+/logs/serve/", log), log
    assert _closed(found.group(1)), "the cluster it started outlived it"
    assert not pointer.exists(), "Ray's pointer to the stopped cluster was left behind"
    # How veRL and OpenRLHF start Ray: a cluster of their own, not the stopped one.
    code = "import ray; ray.init(num_cpus=1); print(ray.cluster_resources()['CPU']); ray.shutdown()"
    after = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert after.returncode == 0 and after.stdout.strip().splitlines()[-1] == "1.0", after.stderr[-3000:]
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _skip_unless_ray_starts(tmp_path: Path, failure: Exception) -> None:
    """rmserve's own cluster did not come up: a skip where Ray itself cannot start, else the test fails."""
    probe = tmp_path / "probe"
    probe.mkdir(exist_ok=True)
    try:
        with ray_head(probe):
            pass
    except RuntimeError as exc:
        pytest.skip(f"a local Ray cluster does not start here ({failure}): {exc}")


# -- on a shared cluster ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    try:
        head = ray_head(tmp_path_factory.mktemp("ray"))
        started = head.__enter__()
    except RuntimeError as exc:
        pytest.skip(f"a local Ray cluster does not start here: {exc}")
    try:
        ray.init(address=started.address, log_to_driver=False)
        yield started
    finally:
        ray.shutdown()
        head.__exit__(None, None, None)


@pytest.fixture(scope="class")
def two_replicas(cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("two-replicas")
    with ray_serve(
        [*REPLICA, "--replicas", "2"], FP32, tmp, port=cluster.http_port, address=cluster.address
    ) as srv:
        yield srv


@pytest.fixture(scope="class")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """``rmserve serve`` with the same settings: the scores Ray's replicas must give."""
    with serve(FP32, tmp_path_factory.mktemp("reference"), timeout=600) as srv:
        yield srv


class TestTwoReplicasOfTheDefaultBundle:
    def test_score_get_reward_and_ready_answer_with_the_scores_of_rmserve_serve(
        self, two_replicas: ServerProcess, reference: ServerProcess
    ) -> None:
        for path, body, key in (
            ("/v1/score", {"items": ITEMS}, "scores"),
            ("/get_reward", {"query": QUERIES}, "rewards"),
        ):
            ours = httpx.post(two_replicas.url + path, json=body, timeout=300)
            theirs = httpx.post(reference.url + path, json=body, timeout=300)
            assert ours.status_code == theirs.status_code == 200, ours.text
            assert ours.json()[key] == pytest.approx(theirs.json()[key], rel=1e-5, abs=1e-6)
            assert ours.headers["x-backend"] == theirs.headers["x-backend"]
            assert ours.headers["x-precision"] == "fp32"
        ready = httpx.get(two_replicas.url + "/health/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"

    def test_requests_spread_over_both_replicas_and_every_answer_names_its_replica(
        self, two_replicas: ServerProcess
    ) -> None:
        def post(i: int) -> httpx.Response:
            return httpx.post(
                two_replicas.url + "/v1/score", json={"items": _long_items(f"spread{i}", 2)}, timeout=300
            )

        answers: list[httpx.Response] = []
        senders = [threading.Thread(target=lambda i=i: answers.append(post(i))) for i in range(12)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        assert {a.status_code for a in answers} == {200}
        assert len({a.headers["x-replica"] for a in answers}) == 2
        bad = httpx.post(two_replicas.url + "/v1/score", json={"items": [{"prompt": 1}]})
        assert bad.status_code == 422 and bad.headers["x-replica"]
        assert "items[0].prompt" in bad.json()["error"]["message"]
        assert bad.headers.get_list("x-request-id") == [bad.json()["error"]["request_id"]]

    def test_one_prefix_key_reaches_one_replica_and_many_keys_reach_both(
        self, two_replicas: ServerProcess
    ) -> None:
        """rmserve.ray.routing ranks replicas by rendezvous hashing of x-prefix-key."""

        def replica(key: str, i: int) -> str:
            body = {"items": [{"prompt": f"shared prompt {key}", "response": f"reply {i}"}]}
            answer = httpx.post(
                two_replicas.url + "/v1/score", json=body, headers={"x-prefix-key": key}, timeout=60
            )
            assert answer.status_code == 200, answer.text
            return answer.headers["x-replica"]

        for key in ("group-a", "group-b", "group-c"):
            assert len({replica(key, i) for i in range(6)}) == 1
        assert len({replica(f"group-{n}", 0) for n in range(16)}) == 2

    def test_each_replica_exports_its_rmserve_metrics_tagged_with_it_to_rays_prometheus_endpoint(
        self, two_replicas: ServerProcess, cluster: RayCluster
    ) -> None:
        served = {
            httpx.post(two_replicas.url + "/v1/score", json={"items": [{"text": f"m{i}"}]}).headers[
                "x-replica"
            ]
            for i in range(16)
        }
        pattern = re.compile(r'^ray_rmserve_items_scored_total\{[^}]*replica="([a-z0-9]+)"', re.M)

        def exported() -> set[str]:
            text = httpx.get(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=60).text
            return set(pattern.findall(text))

        _wait(lambda: exported() >= served, 600, f"items scored by replicas {served} in Ray's export")

    def test_the_handle_client_returns_what_the_http_routes_return(
        self, two_replicas: ServerProcess, cluster: RayCluster
    ) -> None:
        import rmserve.ray

        http = RewardClient(two_replicas.url)
        handle = rmserve.ray.client("rmserve")
        pairs = [(i["prompt"], i["response"]) if "prompt" in i else i for i in ITEMS]
        by_handle_result, by_http_result = handle.score_result(pairs), http.score_result(pairs)
        # Equal but for cache hits: the replica each call reached may have scored these before.
        assert replace(by_handle_result, usage=replace(by_handle_result.usage, cache_hits=0)) == replace(
            by_http_result, usage=replace(by_http_result.usage, cache_hits=0)
        )
        assert handle.get_reward_result(QUERIES) == http.get_reward_result(QUERIES)
        with pytest.raises(ModelNotFoundError) as by_handle:
            handle.score(pairs, model="nope")
        with pytest.raises(ModelNotFoundError) as by_http:
            http.score(pairs, model="nope")
        assert (by_handle.value.status, by_handle.value.message) == (
            by_http.value.status,
            by_http.value.message,
        )

        async def through_async_handle() -> list[float]:
            async with rmserve.ray.async_client("rmserve") as client:
                return await client.score(pairs)

        assert asyncio.run(through_async_handle()) == http.score(pairs)

    def test_verl_and_openrlhf_adapters_score_through_the_handle_when_given_the_ray_app(
        self, two_replicas: ServerProcess, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from rmserve.adapters.openrlhf_reward import reward_func
        from rmserve.adapters.verl import compute_score_sync

        unreachable = f"http://127.0.0.1:{free_port()}"  # nothing there: only the handle can answer
        http = RewardClient(two_replicas.url)
        prompt, response = ITEMS[0]["prompt"], ITEMS[0]["response"]
        verl = compute_score_sync(
            "hh", response, None, {"prompt": prompt}, rmserve_url=unreachable, rmserve_ray_app="rmserve"
        )
        assert verl["score"] == http.score([(prompt, response)])[0]
        monkeypatch.setenv("RMSERVE_URL", unreachable)
        monkeypatch.setenv("RMSERVE_RAY_APP", "rmserve")
        rewards = reward_func(QUERIES, [""] * len(QUERIES), None)["rewards"]
        assert [float(r) for r in rewards] == pytest.approx(http.get_reward(QUERIES, [""] * len(QUERIES)))

    def test_a_replica_killed_mid_load_is_replaced_and_the_clients_retries_lose_no_request(
        self, two_replicas: ServerProcess, reference: ServerProcess, cluster: RayCluster
    ) -> None:
        batches = [_long_items(f"kill{k}", 4) for k in range(24)]
        expected = [RewardClient(reference.url).score(b) for b in batches]
        got: dict[int, list[float]] = {}
        failures: list[BaseException] = []
        client = RewardClient(two_replicas.url, max_retries=10, backoff_s=0.2, max_concurrency=1)

        def send(indices: range) -> None:
            for k in indices:
                try:
                    got[k] = client.score(batches[k])
                except BaseException as exc:  # recorded: the assertion below names it
                    failures.append(exc)

        senders = [threading.Thread(target=send, args=(range(k, 24, 4),)) for k in range(4)]
        for sender in senders:
            sender.start()
        _wait(lambda: len(got) >= 2, 600, "the first answers")
        victim = httpx.post(two_replicas.url + "/v1/score", json={"items": [{"text": "who?"}]}).headers[
            "x-replica"
        ]
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if victim in a["name"]]
        assert len(names) == 1, names
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)  # its process exits at once
        for sender in senders:
            sender.join(timeout=600)
        assert not failures, failures
        assert [got[k] for k in range(24)] == [pytest.approx(e, rel=1e-5, abs=1e-6) for e in expected]

        def replaced() -> bool:
            seen = {
                httpx.post(
                    two_replicas.url + "/v1/score", json={"items": [{"text": f"after {i}"}]}
                ).headers.get("x-replica")
                for i in range(8)
            }
            return _replicas("rmserve") == 2 and victim not in seen

        _wait(replaced, 600, "two running replicas, the killed one not among them")


def test_a_bundle_that_does_not_load_fails_ray_serve_with_the_replicas_reason_and_exit_1(
    cluster: RayCluster, tmp_path: Path
) -> None:
    missing = tmp_path / "no-bundle-here"
    server, proc = ray_serve_process(
        [*REPLICA, "--models", str(missing)], FP32, tmp_path, port=cluster.http_port, address=cluster.address
    )
    try:
        assert proc.wait(timeout=600) == 1, server.log()
    finally:
        stop(proc)
    failure = [line for line in server.log().splitlines() if line.startswith("rmserve: start-up failed:")]
    assert len(failure) == 1 and str(missing) in failure[0], server.log()[-3000:]
    assert _replicas("rmserve") == 0


# A look-back under Ray's deprecated 10 s metrics interval warns; the test wants a short one.
@pytest.mark.filterwarnings("ignore:`look_back_period_s`:FutureWarning")
def test_autoscaling_goes_from_one_to_two_replicas_under_queued_load_and_back_to_one(
    cluster: RayCluster, tmp_path: Path
) -> None:
    args = [*REPLICA, "--min-replicas", "1", "--max-replicas", "2", "--target-items-per-replica", "8"]
    args += ["--look-back-s", "1", "--upscale-delay-s", "1", "--downscale-delay-s", "3", "--app-name", "auto"]
    with ray_serve(
        args, {**FP32, "RMSERVE_CACHE": "off"}, tmp_path, port=cluster.http_port, address=cluster.address
    ) as srv:
        assert _replicas("auto") == 1
        loading = threading.Event()
        statuses: list[int] = []

        def load(worker: int) -> None:
            client = httpx.Client(timeout=600)
            k = 0
            while not loading.is_set():
                k += 1
                reply = client.post(
                    srv.url + "/v1/score", json={"items": _long_items(f"auto{worker}.{k}", 48)}
                )
                statuses.append(reply.status_code)

        # Two requests at a time: Ray's request-count policy (2 per replica) would keep one replica.
        workers = [threading.Thread(target=load, args=(w,)) for w in range(2)]
        for worker in workers:
            worker.start()
        try:
            _wait(lambda: _replicas("auto") == 2, 600, "a second replica for two requests of 48 items")
        finally:
            loading.set()
            for worker in workers:
                worker.join(timeout=600)
        _wait(lambda: _replicas("auto") == 1, 600, "back to one replica once idle")
        assert set(statuses) == {200}, sorted(set(statuses))
