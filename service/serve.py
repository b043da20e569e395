"""``rmserve serve``: settings from flags and env, then uvicorn with a drain on SIGTERM and Ctrl-C.

Slow clients are bounded here and at the edge: a connection must deliver its request headers within
``header_timeout_s`` (else it is closed), its body within ``body_timeout_s`` (else 408, see
``rmserve.api.middleware``). On SIGTERM or SIGINT (Ctrl-C) readiness turns red, uvicorn stops
accepting connections and gives accepted requests ``drain_grace_s`` to finish; requests still waiting
then get a JSON 503; the exit status is 0. A start-up that fails says why and exits 1, before
listening where the cheap checks find the problem (``rmserve.loading.preflight``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
import time
from typing import Any

import uvicorn
from pydantic import ValidationError
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from rmserve.app import create_app
from rmserve.auth import KeyStore
from rmserve.cli import DefaultsHelpFormatter
from rmserve.config import add_settings_arguments, explain_invalid, settings_from_args
from rmserve.loading import preflight
from rmserve.logs import configure_logging
from rmserve.state import AppState

log = logging.getLogger("rmserve")

# uvicorn's lifecycle lines speak of the ASGI lifespan: "Application startup complete" comes before
# the models load (they load in the background, so /health answers meanwhile) and stays in a log
# whose start-up then fails. rmserve says in its own words when it listens, is ready, drains.
_UVICORN_QUIET = (
    "Started server process",
    "Waiting for application startup",
    "Application startup complete",
    "Shutting down",
    "Waiting for application shutdown",
    "Application shutdown complete",
    "Finished server process",
)


class LifecycleLines(logging.Filter):
    """Drops uvicorn's lifecycle lines and says "listening on ..." for its "Uvicorn running on ..."
    (nothing once start-up failed: uvicorn binds its socket only to close it again)."""

    def __init__(self, state: AppState) -> None:
        super().__init__()
        self.state = state

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        if text.startswith(_UVICORN_QUIET):
            return False
        if text.startswith("Uvicorn running on "):
            if self.state.phase == "failed":
                return False
            record.msg = (
                text.replace("Uvicorn running on ", "listening on ", 1).replace(" (Press CTRL+C to quit)", "")
                + "; the models load now, ready when /health/ready says so (Ctrl-C stops)"
            )
        return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rmserve serve",
        description="serve reward model bundles over HTTP",
        formatter_class=DefaultsHelpFormatter,
    )
    add_settings_arguments(parser)
    return parser


def header_deadline_protocol(timeout_s: float) -> type[HttpToolsProtocol]:
    """uvicorn's HTTP protocol, closing a connection whose request headers take over ``timeout_s``
    (from its opening, or from the first byte of each later request on it)."""

    class HeaderDeadlineProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            self._disarm()  # an idle keep-alive connection is uvicorn's keep-alive timeout's business
            super().on_response_complete()

    return HeaderDeadlineProtocol


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except (ValidationError, ValueError) as exc:
        print(f"rmserve: invalid configuration:\n{explain_invalid(exc, args)}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)

    keys = KeyStore.from_settings(settings)
    try:
        preflight(settings, keys)
    except Exception as exc:  # a missing bundle, an empty keys file: said before anything listens
        log.error("start-up failed: %s", exc)
        print(f"rmserve: start-up failed: {exc}", file=sys.stderr)
        return 1

    def fatal(reason: str) -> None:
        print(f"rmserve: start-up failed: {reason}", file=sys.stderr)
        server.should_exit = True

    class DrainingServer(uvicorn.Server):
        """On SIGTERM/SIGINT, readiness turns 503 at once; uvicorn then stops accepting
        connections and lets accepted requests finish within the drain grace."""

        signalled: int | None = None
        draining_since: float | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            state.begin_drain()
            self.signalled = self.signalled or sig
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after its graceful shutdown, so the process would die by
            # SIGTERM, or with a KeyboardInterrupt traceback on Ctrl-C; a completed drain is a clean
            # exit (status 0) for Kubernetes, systemd and a terminal alike.
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list) and sig in captured:
                captured.remove(sig)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            self.draining_since = time.monotonic()
            if self.signalled is not None:  # logged here, not in the signal handler: no lock held there
                log.info(
                    "%s: draining; new requests get 503, accepted ones have %s s to finish",
                    signal.Signals(self.signalled).name,
                    settings.drain_grace_s,
                )
            await super().shutdown(sockets)

    app = create_app(settings, on_fatal=fatal, keys=keys)
    state: AppState = app.state.rmserve
    logging.getLogger("uvicorn.error").addFilter(LifecycleLines(state))
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        http=header_deadline_protocol(settings.header_timeout_s),
        # Past the grace uvicorn cancels what still runs; the edge answers those requests with 503.
        timeout_graceful_shutdown=settings.drain_grace_s,  # type: ignore[arg-type]
        lifespan="on",
        log_config=None,
    )
    server = DrainingServer(config)
    server.run()
    if state.phase == "failed":
        return 1
    took = time.monotonic() - (server.draining_since or time.monotonic())
    log.info("stopped: drained in %.1f s; exit status 0", took)
    return 0
