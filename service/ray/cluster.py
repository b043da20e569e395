"""The Ray cluster ``rmserve ray-serve`` runs on: one it joins, or a local head node it owns.

A local head is Ray's own ``ray start --head --block``, started in a session of its own: a signal
sent to the command's whole process group (a terminal, ``timeout``, a supervisor that signals every
process) reaches the command, which drains, and not the cluster under it, which would die before
the drain. The head stops when the command is done with it, without a trace: Ray's pointer to "the
cluster on this machine" (``ray_current_cluster`` in Ray's temp dir), which ``ray start`` wrote, is
removed when it still names this head, so a later ``ray.init()`` without an address (how veRL and
OpenRLHF start Ray, docs/ray.md) starts a cluster of its own instead of failing to join the stopped one.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Ray prints this once the head node's processes are up.
_STARTED = "Ray runtime started"


def _free_port(avoid: int) -> int:
    """A port free now, other than ``avoid`` (the HTTP port, perhaps just freed by whoever chose it)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != avoid:
            return port


def _ray_cli() -> list[str]:
    script = Path(sys.executable).with_name("ray")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ray.scripts.scripts"]


@contextmanager
def local_head(http_port: int, timeout_s: float = 120.0) -> Iterator[str]:
    """Start a one-node Ray cluster (its port not ``http_port``, which Serve's proxy will take); yield
    its address; stop it on leaving."""
    port = _free_port(avoid=http_port)
    # Token authentication, Ray's default for a new local cluster, said out loud: a driver joining
    # the head, this process, sends the token only when the mode says so.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ["RAY_AUTH_MODE"].lower() == "token":
        _ensure_token()
    with tempfile.NamedTemporaryFile("w+b", prefix="rmserve-ray-head-", suffix=".log") as log:
        head = subprocess.Popen(
            [*_ray_cli(), "start", "--head", f"--port={port}", "--block", "--disable-usage-stats"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # The command drains its application before it stops the head: Ray's own node drain
            # on SIGTERM would only wait (up to 30 s) for the Serve controller, which never idles.
            env={**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
        )
        pointer: tuple[Path, str] | None = None
        try:
            _wait_started(head, Path(log.name), timeout_s)
            pointer = _current_cluster_pointer()
            yield f"127.0.0.1:{port}"
        finally:
            _stop(head)
            if pointer is not None:
                _remove_if_unchanged(*pointer)


def _current_cluster_pointer() -> tuple[Path, str] | None:
    """Ray's file naming the cluster on this machine, and what it says now (the head just wrote it)."""
    from ray._common.utils import get_ray_address_file  # Ray is pinned: its own rule for the path

    path = Path(get_ray_address_file(None))
    try:
        return path, path.read_text()
    except OSError:
        return None


def _remove_if_unchanged(path: Path, written: str) -> None:
    """Remove ``path`` if it still says ``written``: a cluster started since then is left pointed at."""
    try:
        if path.read_text() == written:
            path.unlink()
    except OSError:
        pass


def _ensure_token() -> None:
    """Make the cluster's token where Ray looks for it (``~/.ray/auth_token``), unless there is one.

    A first ``ray.init()`` makes it; ``ray start --head`` in token mode does not, and on a machine that
    never ran Ray it stops with "no authentication token was found". Ray's own ``get-auth-token
    --generate`` makes it (or finds it, in ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or the file) and
    prints it: its output goes nowhere, so no log holds the token.
    """
    made = subprocess.run(
        [*_ray_cli(), "get-auth-token", "--generate"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    if made.returncode != 0:
        tail = made.stderr.strip().splitlines()[-5:]
        raise RuntimeError("no Ray authentication token could be made:\n" + "\n".join(tail))


def _wait_started(head: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while _STARTED not in log.read_text(errors="replace"):
        if head.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError("the local Ray head did not start:\n" + "\n".join(tail))
        time.sleep(0.2)


def _stop(head: subprocess.Popen[bytes]) -> None:
    """SIGTERM: Ray's ``--block`` stops the node's processes, then itself."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
