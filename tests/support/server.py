"""A real rmserve process on loopback, for tests that need real HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, labels: str = "") -> float:
        """Sum of a metric's samples whose line starts with ``name{labels`` (or ``name ``)."""
        text = httpx.get(self.url + "/metrics").text
        total = 0.0
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            base, _, lab = key.partition("{")
            if base == name and all(part in lab for part in labels.split(",") if part):
                total += float(value)
        return total


def wait_ready(url: str, process: subprocess.Popen[bytes] | None = None, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it was ready")
        try:
            if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} was not ready within {timeout} s")


def wait_ready_or_explain(server: ServerProcess, timeout: float) -> None:
    """``wait_ready``, or a RuntimeError carrying the server's log."""
    try:
        wait_ready(server.url, server.process, timeout)
    except Exception as exc:
        raise RuntimeError(f"{exc}\n--- server log ---\n{server.log()}") from None


def _rmserve(python: Path) -> list[str]:
    script = python.with_name("rmserve")
    return [str(script)] if script.is_file() else [str(python), "-m", "rmserve.cli"]


@contextmanager
def serve(
    env: dict[str, str], tmp: Path, *, ready: bool = True, timeout: float = 600.0, python: Path | None = None
) -> Iterator[ServerProcess]:
    """Run ``rmserve serve`` with RMSERVE_* ``env`` on a free port; stop it afterwards. ``python``: the
    interpreter of the environment whose ``rmserve`` runs (default: this one's)."""
    port = free_port()
    full_env = {
        **os.environ,
        "RMSERVE_HOST": "127.0.0.1",
        "RMSERVE_PORT": str(port),
        "RMSERVE_LOG_LEVEL": "warning",
        **env,
    }
    log_path = tmp / f"server-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            # The console script, from outside the clone: what a user's ``rmserve serve`` runs
            # (where none is installed, as on the GPU check's machine, its module).
            _rmserve(python or Path(sys.executable)) + ["serve"],
            env=full_env,
            cwd=tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        if ready:
            wait_ready_or_explain(server, timeout)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
