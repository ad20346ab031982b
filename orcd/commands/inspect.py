"""``orcd inspect FILE``: what a GGUF model is and what it needs to run."""

from __future__ import annotations

import argparse

from orcd.description import describe


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="describe a GGUF model file")
    p.add_argument("file", help="path to a .gguf file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"


def run(args: argparse.Namespace) -> int:
    d = describe(args.file)
    if args.json:
        print(d.model_dump_json(indent=2))
        return 0
    types = ", ".join(f"{t}: {n}" for t, n in d.tensor_types.items())
    rows = [
        ("file", d.path),
        ("architecture", d.architecture),
        ("name", d.name or "-"),
        ("parameters", f"{d.parameter_count:,} ({d.parameter_count / 1e9:.2f} B)"),
        ("file type", d.file_type),
        ("tensors", f"{d.tensor_count} ({types})"),
        ("context length", f"{d.context_length:,}"),
        ("vocabulary", f"{d.vocab_size:,}"),
        ("chat template", "yes" if d.has_chat_template else "no"),
        ("weights", human_bytes(d.weights_bytes)),
        ("KV cache (FP16, full context)", human_bytes(d.kv_cache_bytes)),
        ("estimated GPU memory", human_bytes(d.estimated_gpu_bytes)),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
