"""The ``pdserve`` command.

Each subcommand lives in its own module that exposes ``register(subparsers)``;
handlers import heavy modules (torch, the engine) only when they run, so
``pdserve --help`` stays fast and serving/ keeps no torch import at module level.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module path -> the subcommands it registers
SUBCOMMAND_MODULES = (
    "serving.commands.serve",
    "serving.commands.checkpoint",
    "serving.commands.bench",
    "serving.commands.up",
    "serving.commands.plan",
)


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Serve DeepSeek-V3-architecture models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"pdserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # `python -m serving.cli`: run the imported module's main so CLIError is the same class the handlers raise
    from serving.cli import main as _main

    sys.exit(_main())
