"""The ``rmserve`` command: serve | ray-serve | export | train | eval.

Each command lives in its own module, imported only when it runs, so the client-only install has a
working ``rmserve`` that names the extra a command needs and how to install it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version


@dataclass(frozen=True)
class Command:
    module: str
    extra: str
    help: str


COMMANDS = {
    "serve": Command("rmserve.serve", "server", "serve reward model bundles over HTTP"),
    "ray-serve": Command("rmserve.ray.command", "ray", "serve reward model bundles on a Ray cluster"),
    "export": Command(
        "rmserve.models.export_command", "export", "export a Hugging Face checkpoint to a bundle"
    ),
    "train": Command(
        "rmserve.models.train.command", "train", "train a Bradley-Terry reward model and export it"
    ),
    "eval": Command("rmserve.models.eval.command", "eval", "score preference eval sets: accuracy and plots"),
}


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every command's help: an option that takes a value ends its line with its default, unless
    the line says it already (a default of None means nothing to show, and the help says what); a
    required option says so instead."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if action.option_strings and action.required:
            return f"{text} (required)".strip()
        if not action.option_strings or "default" in text or action.nargs == 0:
            return text
        if default is None or default is argparse.SUPPRESS:
            return text
        if isinstance(default, list | tuple):  # as it is typed: --label-tokens + -
            shown = " ".join(map(str, default)).replace("%", "%%") or "none"
            return f"{text} (default: {shown})".strip()
        return f"{text} (default: %(default)s)".strip()


def _version() -> str:
    try:
        return version("rmserve")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def install_lines(extra: str) -> str:
    """How to add an extra, for each way rmserve is installed (it is not on a public index yet)."""
    wheel = f"dist/rmserve-{_version()}-py3-none-any.whl"
    return (
        f"  from a clone of its repository:  pip install '.[{extra}]'\n"
        f"  from a wheel (python -m build):  pip install '{wheel}[{extra}]'\n"
        f"  from a package index:            pip install 'rmserve[{extra}]'"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rmserve",
        description="Reward models as a service",
        epilog="Each command's options: rmserve COMMAND --help. The documentation is README.md and docs/ in "
        "rmserve's repository: docs/api.md (the HTTP API), docs/trainers.md, docs/composites.md, "
        "docs/models.md, docs/process.md, docs/prefix-reuse.md, docs/eval.md, docs/ray.md, docs/cache.md, "
        "docs/gpu.md, docs/export.md, docs/reliability.md.",
    )
    parser.add_argument("--version", action="version", version=f"rmserve {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub.add_parser(name, help=f"{command.help} (needs rmserve[{command.extra}])", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv)  # prints help, the version or the usage error, and exits
        return 2
    name, command = argv[0], COMMANDS[argv[0]]
    try:
        # A command parses its flags before it imports what it runs on (train and export: torch),
        # so its --help works without the extra and a missing module surfaces here either way.
        return int(importlib.import_module(command.module).main(argv[1:]) or 0)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] == "rmserve":
            raise
        print(
            f"rmserve {name}: needs the {command.extra} extra (missing module {exc.name!r}); "
            f"install it as rmserve came:\n{install_lines(command.extra)}",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
