"""``rmserve ray-serve``: rmserve on Ray Serve, from the same settings as ``rmserve serve``.

Joins the Ray cluster at ``--address`` (or ``RAY_ADDRESS``; ``auto``: the cluster running on this
machine), or starts a one-node cluster of its own (``rmserve.ray.cluster``). It starts Serve's HTTP
proxy on ``--host``/``--port`` (where Serve is not running yet), deploys the application and waits
for its replicas to be ready. Then it blocks until SIGTERM or SIGINT, and drains: the application
is deleted, which stops routing to its replicas and gives each ``drain_grace_s`` to finish what it
accepted; a cluster this command started stops with it. Exit status: 0 after a drain, 1 when the
application failed to start, 2 for invalid settings.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import signal
import sys
import threading
from types import FrameType

from pydantic import ValidationError

from rmserve.config import (
    Settings,
    add_settings_arguments,
    explain_invalid,
    model_from_args,
    settings_from_args,
)
from rmserve.logs import configure_logging
from rmserve.ray.options import RaySettings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rmserve ray-serve",
        description="serve reward model bundles on Ray Serve: replicas on a Ray cluster, scaled by load "
        "(--host/--port: Ray Serve's HTTP proxy)",
    )
    add_settings_arguments(parser)
    add_settings_arguments(parser, RaySettings)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        ray_settings = model_from_args(RaySettings, args)
    except (ValidationError, ValueError) as exc:
        print(f"rmserve: invalid configuration:\n{explain_invalid(exc, args)}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    return run(settings, ray_settings)


def run(settings: Settings, ray_settings: RaySettings) -> int:
    from rmserve.ray.cluster import local_head

    if importlib.util.find_spec("ray") is None:  # before any cluster starts: `rmserve` names the extra
        raise ModuleNotFoundError("No module named 'ray'", name="ray")

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    def catch_signals() -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_signal)

    catch_signals()  # a signal while the head starts still stops it
    with contextlib.ExitStack() as stack:
        address = ray_settings.address or os.environ.get("RAY_ADDRESS")
        own = not address
        if not address:
            address = stack.enter_context(local_head(settings.port))
            say(f"started a local Ray cluster at {address}; it stops when this command does")
        # Ray reads its authentication mode once, at import: after the local head set it.
        import ray
        from ray import serve

        from rmserve.ray.deployment import build

        # Ray's own INFO lines speak of joining "an existing cluster" (the one just started) and of
        # options "not applied" (serve.run's defaults, after serve.start applied ours): rmserve says
        # what it did instead, and --log-level debug shows Ray's lines too.
        ray_level = logging.DEBUG if settings.log_level == "debug" else logging.WARNING
        context = ray.init(address=address, log_to_driver=False, logging_level=ray_level)
        logging.getLogger("ray.serve").setLevel(ray_level)
        stack.callback(ray.shutdown)
        catch_signals()  # again: joining a cluster installs Ray's own SIGTERM handler, which exits at once
        if not own:
            say(f"joined the Ray cluster at {address}; it is left running when this command stops")
        if stop.is_set():
            return 0
        serve.start(http_options={"host": settings.host, "port": settings.port})
        try:
            serve.run(build(settings, ray_settings), name=ray_settings.app_name, route_prefix="/")
        except RuntimeError as exc:
            print(f"rmserve: start-up failed: {_why(ray_settings.app_name) or exc}", file=sys.stderr)
            serve.delete(ray_settings.app_name)
            return 1
        # A driver's context is a RayContext (a client's is not: it has no address_info).
        session = getattr(context, "address_info", {}).get("session_dir", "Ray's session directory")
        say(
            f"application {ray_settings.app_name!r} ready on Ray Serve "
            f"(http://{settings.host}:{settings.port}/); replica logs: Ray's files on each node, "
            f"on this one {session}/logs/serve/"
        )
        while not stop.wait(1.0):
            pass
        say("draining")
        serve.delete(ray_settings.app_name)  # returns once its replicas finished their requests
    say("stopped: the application drained" + ("; the local Ray cluster stopped" if own else ""))
    return 0


def say(line: str) -> None:
    print(f"rmserve: {line}", file=sys.stderr, flush=True)


def _why(app_name: str) -> str | None:
    """The last line of what Serve recorded about the application's failure (a replica's traceback
    ends with the error that stopped it), or None."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return None
    messages = [d.message for d in app.deployments.values() if d.message] or [app.message]
    lines = [line.strip() for text in messages for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None
