"""The ``rmserve`` command: serve | export | train | eval | bench."""

from __future__ import annotations

import argparse
import signal
import sys

from service.config import add_settings_arguments, settings_from_args


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from service.app import create_app
    from service.logs import configure_logging
    from service.state import AppState

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmserve", description="Reward models as a service")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve reward model bundles over HTTP")
    add_settings_arguments(serve)
    serve.set_defaults(func=_serve)
    for name, help_text in OFFLINE.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


# Offline commands need the torch-side extras; their modules own their flags and are imported
# only when run, so `rmserve serve` never imports torch.
OFFLINE = {
    "export": "export a Hugging Face checkpoint to a bundle (needs rmserve[export])",
    "train": "train a Bradley-Terry reward model and export it (needs rmserve[train])",
    "eval": "score preference eval sets: accuracy tables and plots (needs rmserve[eval])",
    "bench": "benchmark the engine, the server and a naive PyTorch server (needs rmserve[dev])",
}
OFFLINE_MODULES = {
    "export": "models.export",
    "train": "models.train",
    "eval": "models.evaluate",
    "bench": "loadtests.bench",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in OFFLINE:
        import importlib

        if argv[0] == "bench":  # the benchmark lives in the repository, beside the package
            sys.path.insert(0, ".")
        try:
            module = importlib.import_module(OFFLINE_MODULES[argv[0]])
        except ImportError as exc:
            extra = "dev" if argv[0] == "bench" else ("eval" if argv[0] == "eval" else argv[0])
            where = " from a clone of the repository" if argv[0] == "bench" else ""
            print(f"rmserve {argv[0]}: {exc}; install rmserve[{extra}] and run it{where}", file=sys.stderr)
            return 2
        return int(module.main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
