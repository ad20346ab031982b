"""``orcd bench attention``: the paged decode-attention kernel (``orcd.nn.decode_attention``) timed on a model's
attention shape, at several batch sizes, with its default launch and (``--sweep``) a grid of launches.

Each row is one layer's decode step: the new key and value stored and every sequence's ``--context`` keys read
through its block table, replayed from a CUDA graph (median of ``--repeat`` replays). The bandwidth column is the
fp16 keys and values the step reads, divided by its time: the figure to set beside the device's copy bandwidth.

Shapes come from ``--model`` (a GGUF file: heads, K/V heads, head size, window, sinks) or from ``--shape
H_Q:H_KV:D[:WINDOW]``. Pools hold random fp16 values; each sequence's blocks are scattered over the pool (a
shuffled block table), as a serving engine's are after a while.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict, dataclass

import torch

from orcd.bench.kernels import time_calls

BLOCK_SIZE = 16


@dataclass(frozen=True)
class AttentionShape:
    heads: int
    kv_heads: int
    head_dim: int
    window: int | None = None
    sinks: bool = False


@dataclass
class AttentionRow:
    batch: int
    context: int
    launch: dict
    us: float | None
    gbps: float | None
    default: bool
    error: str = ""


def shape_of_model(path: str) -> AttentionShape:
    """The attention shape of a GGUF model's decode step (its first layer; GPT-OSS's window layers: ``--shape``)."""
    from orcd.description import open_checked
    from orcd.plugins import get_plugin_manager

    _, config = open_checked(path, get_plugin_manager())
    return AttentionShape(config.head_count, config.head_count_kv, config.head_dim,
                          sinks=config.architecture == "gpt-oss")


def parse_shape(text: str) -> AttentionShape:
    parts = [int(p) for p in text.split(":")]
    if len(parts) not in (3, 4) or parts[0] % parts[1]:
        raise SystemExit(f"--shape {text!r}: H_Q:H_KV:D[:WINDOW], H_Q a multiple of H_KV")
    return AttentionShape(*parts[:3], window=parts[3] if len(parts) == 4 else None)


def read_bytes(shape: AttentionShape, batch: int, context: int) -> int:
    """fp16 keys and values one layer's step reads: each sequence's attended keys (its window, if any)."""
    keys = min(context, shape.window) if shape.window else context
    return 2 * 2 * batch * keys * shape.kv_heads * shape.head_dim


def _inputs(shape: AttentionShape, batch: int, context: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    blocks_per_seq = -(-(context + 1) // BLOCK_SIZE)
    n_blocks = batch * blocks_per_seq + 1
    rows = n_blocks * BLOCK_SIZE
    pool = (rows, shape.kv_heads, shape.head_dim)
    tables = torch.randperm(n_blocks - 1, generator=g)[: batch * blocks_per_seq].reshape(batch, blocks_per_seq)
    return {
        "q": torch.randn(batch, shape.heads, 1, shape.head_dim, generator=g).to(device),
        "k": torch.randn(batch, shape.kv_heads, 1, shape.head_dim, generator=g).to(device),
        "v": torch.randn(batch, shape.kv_heads, 1, shape.head_dim, generator=g).to(device),
        "k_pool": torch.randn(pool, generator=g).to(device, torch.float16),
        "v_pool": torch.randn(pool, generator=g).to(device, torch.float16),
        "tables": tables.to(device),
        "positions": torch.full((batch, 1), context, dtype=torch.long, device=device),
        "sinks": torch.randn(shape.heads, generator=g).to(device) if shape.sinks else None,
    }


def launch_grid(shape: AttentionShape) -> list[dict]:
    """Launches to time besides the default: keys per step, warps, key ranges and (register and fp32 paths) values
    loaded with the keys."""
    from orcd.nn import decode_attention as da

    fp16_dot = shape.heads // shape.kv_heads > da.MAX_FMA_GROUP
    grid = []
    for block_n, warps, splits in itertools.product((16, 32, 64), (2, 4, 8), (None, 2)):
        for early in (False,) if fp16_dot else (False, True):
            grid.append({"block_n": block_n, "warps": warps, "splits": splits, "early_values": early})
    return grid


def bench(shape: AttentionShape, batches: list[int], context: int, repeat: int, sweep: bool,
          device: torch.device) -> list[AttentionRow]:
    from orcd.nn.decode_attention import decode_attention

    rows = []
    scale = shape.head_dim ** -0.5
    for batch in batches:
        t = _inputs(shape, batch, context, device)
        nbytes = read_bytes(shape, batch, context)
        for launch in [{}] + (launch_grid(shape) if sweep else []):
            def call(launch: dict = launch) -> torch.Tensor:
                return decode_attention(t["q"], t["k"], t["v"], t["k_pool"], t["v_pool"], t["tables"], t["positions"],
                                        BLOCK_SIZE, context + 1, scale, shape.window, t["sinks"], **launch)
            try:
                seconds, _ = time_calls([call], repeat)
            except Exception as e:  # noqa: BLE001 -- the compiler may refuse a launch (registers, shared memory)
                rows.append(AttentionRow(batch, context, launch, None, None, not launch, str(e).splitlines()[0][:100]))
                continue
            rows.append(AttentionRow(batch, context, launch, seconds * 1e6, nbytes / seconds / 1e9, not launch))
    return rows


def format_table(shape: AttentionShape, rows: list[AttentionRow], copy_gbps: float | None) -> str:
    lines = [f"decode attention {shape.heads}/{shape.kv_heads} heads, dim {shape.head_dim}"
             + (f", window {shape.window}" if shape.window else "") + (", sinks" if shape.sinks else "")
             + (f"; copy bandwidth {copy_gbps:.0f} GB/s" if copy_gbps else ""),
             f"{'batch':>5} {'context':>7} {'us':>9} {'GB/s':>7}  launch"]
    for batch in sorted({r.batch for r in rows}):
        mine = [r for r in rows if r.batch == batch]
        best = min((r for r in mine if r.us is not None), key=lambda r: r.us, default=None)
        for r in mine:
            if not (r.default or r is best):
                continue
            what = "default" if r.default else "best: " + ", ".join(f"{k}={v}" for k, v in r.launch.items())
            us = f"{r.us:.1f}" if r.us is not None else "-"
            gbps = f"{r.gbps:.0f}" if r.gbps is not None else "-"
            lines.append(f"{r.batch:>5} {r.context:>7} {us:>9} {gbps:>7}  {what}{'  ' + r.error if r.error else ''}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="FILE", help="take the attention shape from this GGUF model")
    p.add_argument("--shape", help="H_Q:H_KV:D[:WINDOW] instead of --model")
    p.add_argument("--batches", default="1,8,32", help="sequences per step, comma-separated")
    p.add_argument("--context", type=int, default=528, help="keys before the new one in every sequence")
    p.add_argument("--repeat", type=int, default=20, help="timed graph replays (median)")
    p.add_argument("--sweep", action="store_true", help="also time a grid of launches; print the best")
    p.add_argument("--json", action="store_true")


def run_args(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise SystemExit("orcd bench attention needs a CUDA device")
    if (args.model is None) == (args.shape is None):
        raise SystemExit("give one of --model and --shape")
    shape = shape_of_model(args.model) if args.model else parse_shape(args.shape)
    device = torch.device("cuda")
    rows = bench(shape, [int(b) for b in args.batches.split(",")], args.context, args.repeat, args.sweep, device)
    if args.json:
        print(json.dumps({"shape": asdict(shape), "rows": [asdict(r) for r in rows]}, indent=1))
    else:
        from orcd.bench.dequant import copy_bandwidth

        print(format_table(shape, rows, copy_bandwidth(device)))
    return 0
