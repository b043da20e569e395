"""``rmserve serve``: settings from flags and env, then uvicorn with a drain on SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys

import uvicorn
from pydantic import ValidationError

from rmserve.app import create_app
from rmserve.config import add_settings_arguments, settings_from_args
from rmserve.logs import configure_logging
from rmserve.state import AppState


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmserve serve", description="serve reward model bundles over HTTP")
    add_settings_arguments(parser)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except (ValidationError, ValueError) as exc:
        print(f"rmserve: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)

    class DrainingServer(uvicorn.Server):
        """On SIGTERM/SIGINT, readiness turns 503 at once; uvicorn then stops accepting
        connections and lets accepted requests finish within the drain grace."""

        def handle_exit(self, sig: int, frame: object) -> None:
            state.begin_drain()
            super().handle_exit(sig, frame)  # type: ignore[arg-type]
            if sig == signal.SIGTERM:
                # uvicorn re-raises the signal after its graceful shutdown, so the process would die
                # by SIGTERM; a completed drain is a clean exit (status 0) for Kubernetes and systemd.
                captured = getattr(self, "_captured_signals", None)
                if isinstance(captured, list) and sig in captured:
                    captured.remove(sig)

    def fatal(reason: str) -> None:
        print(f"rmserve: start-up failed: {reason}", file=sys.stderr)
        server.should_exit = True

    app = create_app(settings, on_fatal=fatal)
    state: AppState = app.state.rmserve
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=int(settings.drain_grace_s) or None,
        lifespan="on",
        log_config=None,
    )
    server = DrainingServer(config)
    server.run()
    return 1 if state.phase == "failed" else 0
