"""``orcd synth``: write a synthetic GGUF model (random weights, real names, metadata and tokenizer)."""

from __future__ import annotations

import argparse
import sys

from orcd.testing.filetypes import FILE_TYPES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a synthetic GGUF model for tests and benchmarks")
    p.add_argument("--arch", required=True, help="architecture name (see `orcd plugins`)")
    p.add_argument("--preset", default="tiny", help="size preset: tiny or a real model's shape")
    p.add_argument("--type", dest="file_type", default="F32", choices=list(FILE_TYPES), help="GGUF file type")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True, help="path of the .gguf file to write")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from orcd.testing.synth import synthesize

    try:
        path = synthesize(args.output, args.arch, args.preset, args.file_type, args.seed,
                          progress=lambda line: print(line, file=sys.stderr))
    except ValueError as e:
        print(f"orcd synth: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0
