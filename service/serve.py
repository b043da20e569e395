"""``rmserve serve``: settings from flags and env, then uvicorn with a drain on SIGTERM.

Slow clients are bounded here and at the edge: a connection must deliver its request headers within
``header_timeout_s`` (else it is closed), its body within ``body_timeout_s`` (else 408, see
``rmserve.api.middleware``). On SIGTERM readiness turns red, uvicorn stops accepting connections and
gives accepted requests ``drain_grace_s`` to finish; requests still waiting then get a JSON 503.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

import uvicorn
from pydantic import ValidationError
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from rmserve.app import create_app
from rmserve.config import add_settings_arguments, explain_invalid, settings_from_args
from rmserve.logs import configure_logging
from rmserve.state import AppState


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmserve serve", description="serve reward model bundles over HTTP")
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

    class DrainingServer(uvicorn.Server):
        """On SIGTERM/SIGINT, readiness turns 503 at once; uvicorn then stops accepting
        connections and lets accepted requests finish within the drain grace."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            state.begin_drain()
            super().handle_exit(sig, frame)
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
        http=header_deadline_protocol(settings.header_timeout_s),
        # Past the grace uvicorn cancels what still runs; the edge answers those requests with 503.
        timeout_graceful_shutdown=settings.drain_grace_s,  # type: ignore[arg-type]
        lifespan="on",
        log_config=None,
    )
    server = DrainingServer(config)
    server.run()
    return 1 if state.phase == "failed" else 0
