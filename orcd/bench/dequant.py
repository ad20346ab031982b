"""Dequantize throughput per block format: orcd's torch dequantizers beside gguf's numpy ones.

``python -m orcd.bench.dequant [--device cpu|cuda|all] [--sizes 4M,64M] [--types Q4_K,MXFP4] [--json]``

Throughput is GB/s of float32 output (``4 * values / seconds``) for the fastest of ``--repeat`` timed calls after
warm-up calls (the best time is the stable estimate on a shared machine; the median is kept in ``--json``); CUDA
timings are bracketed by ``torch.cuda.synchronize``. gguf's numpy dequantizer runs on the CPU
on the same blocks (the same numbers appear in every device's table). On CUDA the device-to-device copy bandwidth
(read + write bytes per second of a large ``copy_``) is measured as the ceiling, and each format's memory traffic
(blocks read + float32 written) is shown as a fraction of it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import gguf
import numpy as np
import torch

from orcd.plugins import OrcdPluginManager, get_plugin_manager
from orcd.quant import QuantFormat

DEFAULT_SIZES = {"cpu": (1 << 24,), "cuda": (1 << 24, 1 << 26)}  # CPU: 64 MiB out, past L3
COPY_BYTES = 1 << 30


@dataclass
class Result:
    type: str
    device: str
    values: int
    block_bytes: int
    seconds: float | None  # best call; None when dequantize returns a view of the blocks (nothing is decoded)
    median_seconds: float | None
    gbps: float | None  # GB/s of float32 output, from the best call
    gguf_seconds: float | None  # None when skipped, or when gguf returns a view (F32)
    gguf_gbps: float | None
    traffic_fraction: float | None = None  # (blocks read + output written) / copy bandwidth, CUDA only


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int) -> tuple[float, float]:
    """Best and median seconds of ``fn()`` over ``repeat`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def copy_bandwidth(device: torch.device, n_bytes: int = COPY_BYTES, repeat: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds, _ = time_call(lambda: dst.copy_(src), device, warmup=3, repeat=repeat)
    return 2 * n_bytes / seconds / 1e9


def bench_format(
    fmt: QuantFormat, device: torch.device, n_values: int, rng: np.random.Generator,
    warmup: int = 2, repeat: int = 5, with_gguf: bool = True,
) -> Result:
    n_blocks = n_values // fmt.block_size
    raw = fmt.random_blocks(n_blocks, rng, scale=0.02)
    blocks = torch.from_numpy(raw).to(device)
    out_bytes = 4 * n_blocks * fmt.block_size
    with torch.inference_mode():
        probe = fmt.dequantize(blocks)
        is_view = probe.untyped_storage().data_ptr() == blocks.untyped_storage().data_ptr()
        del probe
        seconds, median = (None, None)
        if not is_view:
            seconds, median = time_call(lambda: fmt.dequantize(blocks), device, warmup, repeat)
    gguf_seconds = None
    flat = raw.reshape(1, -1)
    qtype = gguf.GGMLQuantizationType(fmt.ggml_type)
    if with_gguf and not np.shares_memory(gguf.quants.dequantize(flat, qtype), flat):
        # Already warmed up by the call above; gguf is slow, so fewer repeats.
        gguf_call = lambda: gguf.quants.dequantize(flat, qtype)  # noqa: E731
        gguf_seconds, _ = time_call(gguf_call, torch.device("cpu"), 0, (repeat + 1) // 2)
    return Result(
        type=fmt.name, device=str(device), values=n_blocks * fmt.block_size, block_bytes=raw.nbytes,
        seconds=seconds, median_seconds=median, gbps=None if seconds is None else out_bytes / seconds / 1e9,
        gguf_seconds=gguf_seconds, gguf_gbps=None if gguf_seconds is None else out_bytes / gguf_seconds / 1e9,
    )


def run(
    device: str | torch.device = "cpu",
    sizes: Sequence[int] | None = None,
    types: Sequence[str] | None = None,
    plugins: OrcdPluginManager | None = None,
    repeat: int = 5,
    with_gguf: bool = True,
    seed: int = 0,
) -> dict:
    """Benchmark every registered format (or ``types``) on ``device`` for each size in ``sizes`` (values of output
    per call, rounded down to whole blocks). Returns ``{"device", "device_name", "threads", "copy_gbps",
    "results": [Result as dict, ...]}``."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available")
    plugins = plugins or get_plugin_manager()
    formats = sorted(plugins.quant_formats.values(), key=lambda f: int(f.ggml_type))
    if types:
        wanted = {t.upper() for t in types}
        formats = [f for f in formats if f.name in wanted]
        missing = wanted - {f.name for f in formats}
        if missing:
            raise ValueError(f"no registered format for {', '.join(sorted(missing))}")
    sizes = tuple(sizes or DEFAULT_SIZES[device.type])
    copy_gbps = copy_bandwidth(device) if device.type == "cuda" else None
    rng = np.random.default_rng(seed)
    results = []
    for n_values in sizes:
        for fmt in formats:
            r = bench_format(fmt, device, n_values, rng, repeat=repeat, with_gguf=with_gguf)
            if copy_gbps and r.seconds:
                r.traffic_fraction = (r.block_bytes + 4 * r.values) / r.seconds / 1e9 / copy_gbps
            results.append(r)
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "copy_gbps": copy_gbps,
        "results": [asdict(r) for r in results],
    }


def format_table(report: dict) -> str:
    head = f"device {report['device']} ({report['device_name']}, {report['threads']} CPU threads)"
    if report["copy_gbps"]:
        head += f"; device-to-device copy {report['copy_gbps']:.0f} GB/s (read + write)"
    lines = [head, "GB/s of float32 output; gguf = gguf.quants.dequantize (numpy, CPU) on the same blocks"]
    cols = f"{'type':<6} {'values':>8} {'out MiB':>8} {'orcd GB/s':>10} {'gguf GB/s':>10} {'x gguf':>7}"
    if report["copy_gbps"]:
        cols += f" {'% copy bw':>10}"
    lines.append(cols)
    for r in report["results"]:
        orcd_s = "view" if r["gbps"] is None else f"{r['gbps']:.2f}"
        gguf_s = "-" if r["gguf_gbps"] is None else f"{r['gguf_gbps']:.2f}"
        ratio = "-" if r["gbps"] is None or r["gguf_gbps"] is None else f"{r['gbps'] / r['gguf_gbps']:.1f}"
        mib = 4 * r["values"] / 2**20
        line = f"{r['type']:<6} {_count(r['values']):>8} {mib:>8.0f} {orcd_s:>10} {gguf_s:>10} {ratio:>7}"
        if report["copy_gbps"]:
            frac = "-" if r["traffic_fraction"] is None else f"{100 * r['traffic_fraction']:.0f}%"
            line += f" {frac:>10}"
        lines.append(line)
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 2**20:.0f}M" if n >= 2**20 else f"{n / 2**10:.0f}K"


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="all", help="cpu, cuda, cuda:N or all (cpu, plus cuda if present)")
    parser.add_argument("--sizes", help="values per call, comma-separated (4M,64M); default per device")
    parser.add_argument("--types", help="comma-separated ggml type names (default: every registered format)")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per measurement (median reported)")
    parser.add_argument("--no-gguf", action="store_true", help="skip gguf's numpy dequantizer (slow at large sizes)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orcd.bench.dequant", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_args(parser.parse_args(argv))


def run_args(args: argparse.Namespace) -> int:
    """Run from parsed arguments (``main`` and ``orcd bench dequant``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "all":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]
    sizes = [parse_size(s) for s in args.sizes.split(",")] if args.sizes else None
    types = args.types.split(",") if args.types else None
    reports = [run(d, sizes, types, repeat=args.repeat, with_gguf=not args.no_gguf) for d in devices]
    if args.json:
        json.dump(reports, sys.stdout, indent=1)
        print()
    else:
        print("\n\n".join(format_table(r) for r in reports))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
