"""The ``orcd`` command line. Each subcommand lives in ``orcd/commands/<name>.py`` with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from orcd import __version__
from orcd.errors import OrcdError

COMMANDS = ("serve", "generate", "tokenize", "inspect", "plugins", "synth", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orcd", description="GGUF inference worker")
    parser.add_argument("--version", action="version", version=f"orcd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"orcd.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"orcd.commands.{name}":
                raise
            continue  # a command that has not landed yet
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s"
    )
    try:
        return int(args.run(args) or 0)
    except OrcdError as e:
        print(f"orcd {args.command}: error: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
