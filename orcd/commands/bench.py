"""``orcd bench``: benchmarks that print a table (``orcd bench dequant``; model benchmarks join here)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks that print a table")
    kinds = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    from orcd.bench import dequant

    d = kinds.add_parser("dequant", help="dequantize throughput per block format (orcd torch vs gguf numpy)")
    dequant.add_arguments(d)
    d.set_defaults(run=dequant.run_args)

    from orcd.bench import model

    m = kinds.add_parser("model", help="prompt and decode throughput of a model file, beside llama.cpp")
    model.add_arguments(m)
    m.set_defaults(run=model.run_args)

    from orcd.bench import kernels

    k = kinds.add_parser("kernels", help="fused dequantize-matmul kernels vs the reference path (CUDA)")
    kernels.add_arguments(k)
    k.set_defaults(run=kernels.run_args)

    from orcd.bench import attention

    a = kinds.add_parser("attention", help="the paged decode-attention kernel on a model's shape (CUDA)")
    attention.add_arguments(a)
    a.set_defaults(run=attention.run_args)

    from orcd.bench import profile

    f = kinds.add_parser("profile", help="where a decode step's time goes: device kernels vs host, per step")
    profile.add_arguments(f)
    f.set_defaults(run=profile.run_args)
