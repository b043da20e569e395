"""A real Redis for tests: find one that answers, or start a private redis-server process.

``shared_redis_url()`` picks, in order: RMSERVE_TEST_REDIS_URL; 127.0.0.1:6379 when it answers PING;
a redis-server started here on a free port (stopped at exit); else None (the caller skips, saying why).
Tests write under a key prefix of their own (``unique_prefix()``) and delete it afterwards
(``delete_prefix``). ``RedisProcess`` is a private server a test may kill and restart on the same
port, to prove the service rides out an outage.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import redis

from tests.support.server import free_port

ENV = "RMSERVE_TEST_REDIS_URL"
LOCAL = "redis://127.0.0.1:6379/0"


def answers(url: str, timeout: float = 0.5) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


class RedisProcess:
    """A redis-server of our own: no persistence, loopback only; stop() and start() keep the port."""

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        *,
        extra: tuple[str, ...] = (),
        sentinel_of: int | None = None,
    ) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.extra = extra
        self.sentinel_of = sentinel_of  # a master's port: run as a Sentinel watching it as "mymaster"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / f"redis-{self.port}.log"

    def start(self, timeout: float = 10.0) -> RedisProcess:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not on PATH")
        self.directory.mkdir(parents=True, exist_ok=True)
        common = [
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.log_path),
            *self.extra,
        ]
        if self.sentinel_of is None:
            args = [binary, *common, "--save", "", "--appendonly", "no"]
        else:  # a Sentinel rewrites its config file, so it gets one of its own
            config = self.directory / f"sentinel-{self.port}.conf"
            config.write_text(
                f"sentinel monitor mymaster 127.0.0.1 {self.sentinel_of} 1\n"
                "sentinel down-after-milliseconds mymaster 5000\n"
            )
            args = [binary, str(config), "--sentinel", *common]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not answers(self.url, 0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Kill it at once (SIGKILL): an outage, not a clean shutdown."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_started: list[RedisProcess] = []


def shared_redis_url(tmp: Path) -> tuple[str | None, str]:
    """(url, how it was found) or (None, why there is none)."""
    url = os.environ.get(ENV)
    if url:
        if not answers(url, 2.0):
            return None, f"{ENV}={url} does not answer PING"
        return url, f"{ENV}"
    if answers(LOCAL):
        return LOCAL, "127.0.0.1:6379"
    if shutil.which("redis-server") is None:
        return (
            None,
            f"no Redis: {ENV} is unset, nothing answers at 127.0.0.1:6379, and redis-server is not on PATH",
        )
    if not _started:
        _started.append(RedisProcess(tmp).start())
        atexit.register(_started[0].stop)
    return _started[0].url, "a redis-server started for the tests"


def unique_prefix() -> str:
    return f"rmserve-test:{uuid.uuid4().hex[:12]}:"


def delete_prefix(url: str, prefix: str) -> int:
    """Delete every key under ``prefix`` (SCAN, never KEYS); returns how many."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        names = list(client.scan_iter(match=prefix + "*", count=1000))
        for start in range(0, len(names), 500):
            client.delete(*names[start : start + 500])
        return len(names)
    finally:
        client.close()


class RedisClusterProcesses:
    """A real Redis Cluster of ``size`` primaries on loopback, slots split evenly, no replicas."""

    def __init__(self, directory: Path, size: int = 3) -> None:
        self.nodes = [
            RedisProcess(
                directory / f"node{i}",
                _cluster_port(),
                extra=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
            )
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:2])

    def start(self, timeout: float = 20.0) -> RedisClusterProcesses:
        for node in self.nodes:
            node.start()
        clients = [redis.Redis(port=n.port, socket_timeout=5) for n in self.nodes]
        try:
            slots, size = 16384, len(self.nodes)
            for i, client in enumerate(clients):
                client.execute_command(
                    "CLUSTER ADDSLOTSRANGE", i * slots // size, (i + 1) * slots // size - 1
                )
            for node in self.nodes[1:]:
                clients[0].execute_command("CLUSTER MEET", "127.0.0.1", node.port)
            deadline = time.monotonic() + timeout
            while not all(_cluster_ok(c) for c in clients):
                if time.monotonic() > deadline:
                    raise RuntimeError("the test cluster did not reach cluster_state:ok")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        finally:
            for client in clients:
                client.close()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisClusterProcesses:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        port = free_port()
        if port > 55535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def _cluster_ok(client: redis.Redis) -> bool:
    info = client.execute_command("CLUSTER INFO")
    if isinstance(info, dict):  # parsed by redis-py
        return str(info.get("cluster_state")) == "ok"
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text
