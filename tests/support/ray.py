"""A real local Ray cluster and ``rmserve ray-serve`` processes on it, for the Ray Serve tests.

The cluster is Ray's own ``ray start --head --block`` in a session of its own, on loopback, with
Serve's autoscaling metrics pushed every half second (the default, ten, would make the autoscaling
test wait minutes). Token authentication is off: the cluster listens on this machine only and lives
for one test module.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.server import ServerProcess, free_port, wait_ready_or_explain

RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


@dataclass
class RayCluster:
    address: str
    http_port: int  # Serve's proxy port: one per cluster, fixed by the first application
    metrics_port: int  # where Ray's metrics agent exports every process's metrics for Prometheus
    process: subprocess.Popen[bytes]
    log_path: Path


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


@contextmanager
def ray_head(tmp: Path, timeout: float = 600.0) -> Iterator[RayCluster]:
    """A one-node cluster (2 CPUs); stopped, with every process it started, on leaving."""
    port, metrics_port = free_port(), free_port()
    log_path = tmp / "ray-head.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [_bin("ray"), "start", "--head", f"--port={port}", "--num-cpus=2", "--block"]
            + [
                "--include-dashboard=false",
                "--node-ip-address=127.0.0.1",
                f"--metrics-export-port={metrics_port}",
            ],
            env={**os.environ, **RAY_ENV},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    cluster = RayCluster(f"127.0.0.1:{port}", free_port(), metrics_port, proc, log_path)
    try:
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ray start failed:\n" + log_path.read_text(errors="replace")[-2000:])
            time.sleep(0.2)
        yield cluster
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def ray_serve_process(
    args: list[str], env: dict[str, str], tmp: Path, *, port: int, address: str | None
) -> tuple[ServerProcess, subprocess.Popen[bytes]]:
    """``rmserve ray-serve ARGS`` (joining ``address``, or starting its own cluster), not waited on."""
    full_env = {**os.environ, **RAY_ENV, "RMSERVE_LOG_LEVEL": "warning", **env}
    if address is None:
        full_env.pop("RAY_AUTH_MODE")  # a cluster of its own: Ray's default, token authentication
    else:
        args = [*args, "--address", address]
    log_path = tmp / f"ray-serve-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [_bin("rmserve"), "ray-serve", "--host", "127.0.0.1", "--port", str(port), *args],
            env=full_env,
            cwd=tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return ServerProcess(f"http://127.0.0.1:{port}", proc, log_path), proc


@contextmanager
def ray_serve(
    args: list[str], env: dict[str, str], tmp: Path, *, port: int, address: str | None, timeout: float = 600.0
) -> Iterator[ServerProcess]:
    """``rmserve ray-serve`` ready to answer; SIGTERM (a drain) and waited for on leaving."""
    server, proc = ray_serve_process(args, env, tmp, port=port, address=address)
    try:
        wait_ready_or_explain(server, timeout)
        yield server
    finally:
        stop(proc, timeout=120)
