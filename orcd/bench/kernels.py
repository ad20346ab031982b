"""Fused dequantize-matmul kernels beside the reference path (dequantize, then ``torch.matmul``), on CUDA.

``python -m orcd.bench.kernels [--types Q4_K,MXFP4] [--shapes 896x896,...] [--m 1,512] [--dtype float16]
[--no-moe] [--sweep] [--json]``

For each format and weight shape ``N x K`` (output rows x row length: Qwen2.5-0.5B's projections and LM head,
GPT-OSS-20B's 2880 x 2880 expert), ``x`` of ``M`` rows is multiplied by the weight through the format's fused
kernel (``QuantFormat.linear``) and through ``orcd.quant.reference_linear``. Shapes whose row length is not a
multiple of the format's block are skipped (K-quants need 256: only 896 x 4864 of Qwen2.5-0.5B qualifies).

Timing: ``torch.cuda.Event`` around replays of a CUDA graph that holds one call per weight copy; the copies together
exceed 4x the L2 cache, so weights come from device memory as they would in a model; the median over ``--repeat``
replays, divided by the calls per replay, after warm-up (compilation included there). A graph removes Python's
launch overhead, which the decode step will also remove. GB/s counts the weight bytes read once per call (the
kernels' minimum traffic) against the measured device-to-device copy bandwidth (bytes read + written per second),
TFLOP/s counts ``2 M N K``. The mixture-of-experts rows run GPT-OSS-20B's expert tensor (32 x 2880 x 2880, MXFP4,
top-4) for 1 token (decode) and 512 tokens (prefill) through ``orcd_quant_formats.kernels.expert_linear`` beside
the reference: the chosen experts decoded and multiplied in one batched matmul (decode; what ``moe.py`` does now),
or once per chosen expert (prefill; eager, since that path syncs with the host). ``--sweep`` times a grid of kernel
launch configurations for each format and shape, for tuning ``pick_config``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from orcd.bench.dequant import copy_bandwidth
from orcd.device import MATMUL_PRECISION_HELP, MATMUL_PRECISIONS, set_matmul_precision
from orcd.plugins import OrcdPluginManager, get_plugin_manager
from orcd.quant import QuantFormat, QuantizedTensor, reference_linear

DEFAULT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "MXFP4")
DEFAULT_SHAPES = ((896, 896), (4864, 896), (896, 4864), (151936, 896), (2880, 2880))
DEFAULT_M = (1, 512)
MOE_SHAPE = (32, 2880, 2880)  # GPT-OSS-20B: experts, rows, columns (each of gate, up, down)
MOE_TOP_K = 4
MOE_TOKENS = (1, 512)
MAX_COPIES = 512


@dataclass
class Row:
    kind: str  # "linear" or "moe"
    type: str
    n: int
    k: int
    m: int  # rows of x (linear) or tokens (moe)
    weight_bytes: int  # bytes one call must read
    fused_s: float | None
    reference_s: float | None
    timing: str  # "graph" or "eager"
    calls_per_replay: int
    note: str = ""
    flops: float = field(init=False)

    def __post_init__(self) -> None:
        pairs = self.m * (MOE_TOP_K if self.kind == "moe" else 1)
        self.flops = 2.0 * pairs * self.n * self.k


def _events_median(run: Callable[[], object], calls: int, repeat: int) -> float:
    for _ in range(3):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeat):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def time_calls(fns: Sequence[Callable[[], object]], repeat: int, graph: bool = True) -> tuple[float, str]:
    """Median seconds per call of ``fns`` (run in turn), replayed from a CUDA graph when ``graph``."""
    for fn in fns:  # compile and allocate outside the capture
        fn()
    torch.cuda.synchronize()
    if not graph:
        return _events_median(lambda: [fn() for fn in fns], len(fns), repeat), "eager"
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in fns:
            fn()
    try:
        return _events_median(g.replay, len(fns), repeat), "graph"
    finally:
        del g
        torch.cuda.empty_cache()


def _copies(n_bytes: int, device: torch.device) -> int:
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(1, min(MAX_COPIES, math.ceil(4 * l2 / n_bytes)))


def _weights(fmt: QuantFormat, shape: tuple[int, ...], copies: int, device: torch.device,
             rng: np.random.Generator) -> list[QuantizedTensor]:
    """``copies`` tensors of ``shape``: one random set of blocks, copied on the device (drawing is slow)."""
    rows, k = math.prod(shape[:-1]), shape[-1]
    raw = fmt.random_blocks(rows * k // fmt.block_size, rng, scale=0.02)
    first = QuantizedTensor.from_raw(f"bench.{fmt.name}", raw, fmt, shape, device)
    return [first] + [QuantizedTensor(first.name, first.data.clone(), fmt, shape) for _ in range(copies - 1)]


def bench_linear(fmt: QuantFormat, n: int, k: int, m: int, dtype: torch.dtype, device: torch.device,
                 repeat: int, rng: np.random.Generator) -> Row:
    bytes_one = n * fmt.row_bytes(k)
    copies = _copies(bytes_one, device)
    weights = _weights(fmt, (n, k), copies, device, rng)
    x = torch.randn(m, k, device=device, dtype=dtype)
    if fmt.linear(x, weights[0], None) is None:
        fused_s, mode, note = None, "-", "no kernel"
    else:
        fused_s, mode = time_calls([lambda w=w: fmt.linear(x, w, None) for w in weights], repeat)
        note = ""
    ref_weights = weights[: max(1, min(copies, 64))]  # the reference is slow: fewer calls per replay
    reference_s, _ = time_calls([lambda w=w: reference_linear(x, w, None) for w in ref_weights], repeat)
    del weights, ref_weights
    return Row("linear", fmt.name, n, k, m, bytes_one, fused_s, reference_s, mode, copies, note)


def bench_moe(fmt: QuantFormat, tokens: int, dtype: torch.dtype, device: torch.device, repeat: int,
              rng: np.random.Generator, shape: tuple[int, int, int] = MOE_SHAPE) -> Row:
    from orcd_quant_formats.kernels import expert_linear

    n_expert, n, k = shape
    (weight,) = _weights(fmt, shape, 1, device, rng)
    calls = 16  # different expert choices per call, so the chosen experts are not all in L2
    ids = [torch.rand(tokens, n_expert, device=device).topk(MOE_TOP_K, dim=-1).indices for _ in range(calls)]
    x = torch.randn(tokens, k, device=device, dtype=dtype)
    expert_bytes = weight.nbytes // n_expert
    distinct = statistics.mean(len(set(i.reshape(-1).tolist())) for i in ids)
    if expert_linear(x, weight, ids[0]) is None:
        fused_s, mode = None, "-"
    else:
        fused_s, mode = time_calls([lambda i=i: expert_linear(x, weight, i) for i in ids], repeat)
    if tokens * MOE_TOP_K <= n_expert:
        reference_s, ref_mode = time_calls([lambda i=i: _moe_gathered(x, weight, i) for i in ids], repeat)
    else:
        reference_s, ref_mode = time_calls([lambda i=i: _moe_grouped(x, weight, i) for i in ids[:2]],
                                           max(3, repeat // 4), graph=False)
    return Row("moe", fmt.name, n, k, tokens, int(distinct * expert_bytes), fused_s, reference_s, mode, calls,
               f"{distinct:.1f} experts/call, ref {ref_mode}")


def _moe_gathered(x: torch.Tensor, weight: QuantizedTensor, ids: torch.Tensor) -> torch.Tensor:
    """The decode reference: the chosen experts' blocks gathered, decoded at once, one batched matmul."""
    n_expert, n, k = weight.shape
    flat = ids.reshape(-1)
    blocks = weight.data.view(n_expert, n, -1).index_select(0, flat).reshape(-1, weight.fmt.type_size)
    w = weight.fmt.dequantize(blocks).view(flat.numel(), n, k).to(x.dtype)
    return torch.bmm(w, x.repeat_interleave(ids.shape[-1], 0).unsqueeze(-1)).squeeze(-1)


def _moe_grouped(x: torch.Tensor, weight: QuantizedTensor, ids: torch.Tensor) -> torch.Tensor:
    """The prefill reference: pairs sorted by expert, each chosen expert decoded once (tile by tile)."""
    n_expert, n, k = weight.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_expert).tolist()
    out = x.new_empty(flat.numel(), n)
    start = 0
    for e, count in enumerate(counts):
        if count:
            pairs = order[start:start + count]
            start += count
            w = QuantizedTensor(weight.name, weight.data[e * n:(e + 1) * n], weight.fmt, (n, k))
            out.index_copy_(0, pairs, reference_linear(x.index_select(0, pairs // ids.shape[-1]), w, None))
    return out


def decode_grid(ggml_type: int, m: int, n: int, k: int, device: torch.device) -> list:
    """Decode kernel launches to time: (row, part) pairs per thread 4 or 8; a row's lanes in one warp (narrow) or in
    every warp of the program (wide); each also without split-K where the chosen split would cut K."""
    from orcd_quant_formats.kernels import matmul

    grid = []
    for warps in (1, 2, 4, 8):
        for per_thread in (4, 8):
            for nb in sorted({32, 32 * warps}):
                cfg = matmul.Config(bm=m, bn=per_thread * 32 * warps // nb, dot=False, nb=nb, warps=warps,
                                    parts=matmul.DECODE_PARTS)
                grid.append(cfg)
                if matmul._plan(ggml_type, cfg, 1, n, k, device)[0] > 1:
                    grid.append(replace(cfg, split=1))
    return grid


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def batch_decode_grid(m: int) -> list:
    """Decode kernel launches for a batch of ``m`` rows past ``DECODE_MAX_ROWS``: blocks of that many rows, each
    block of programs re-reading the weights (mostly from L2: the blocks of one weight tile are neighbours in the
    launch order, so they run side by side)."""
    from orcd_quant_formats.kernels import matmul

    rows = matmul.DECODE_MAX_ROWS
    return [matmul.Config(bm=rows, bn=bn, dot=False, nb=32 * warps, warps=warps, parts=matmul.DECODE_PARTS)
            for warps, bn in ((2, 8), (4, 8), (8, 8))]


def batch_dot_grid(m: int) -> list:
    """tl.dot launches for a decode batch (``m`` rows up to ``TABLE_MAX_ROWS``): one block of rows, the rule's
    64 weight rows a program with 4 and 8 warps, 128 with 8, and 16 rows (more programs, fewer registers: compiled for sm_90,
    fp32 Q4_K at 32 x 16 takes 185 registers and 20 KiB of shared memory, at 32 x 64 226 and 112 KiB; 32 x 32 spilled
    608 bytes a thread, so it is not in the grid)."""
    from orcd_quant_formats.kernels import matmul

    bm = max(16, _pow2(m))
    tiles = [matmul.Config(bm=bm, bn=16, dot=True, nb=2, warps=4), matmul.Config(bm=bm, bn=64, dot=True, nb=2, warps=4),
             matmul.Config(bm=bm, bn=64, dot=True, nb=2, warps=8), matmul.Config(bm=bm, bn=128, dot=True, nb=2, warps=8)]
    # each also without split-K: its partial sums cost a reduction kernel a projection (129 a Phi-3 step at 32 rows)
    return tiles + [replace(cfg, split=1) for cfg in tiles]


def codes_grid(m: int) -> list:
    """Code-dot launches (fp32 x, ``codes_dot.TYPES``) for a decode batch of ``m`` rows: one block of rows, 64
    weight rows a program with 8 warps, 32 with 4, 128 with 8. Compiled for sm_90 (2026-12-08), none spills; at 32
    rows they take 108 to 128 registers (64 x 8 warps), 138 to 248 (32 x 4) and 128 to 210 (128 x 8) across the
    eight formats, and 4 to 12 KiB of shared memory (the fp32 tl.dot launch of Q4_K at 32 x 64: 226 and 112 KiB)."""
    from orcd_quant_formats.kernels import matmul

    bm = max(16, _pow2(m))
    return [matmul.Config(bm=bm, bn=64, dot=True, nb=2, warps=8, codes=True),
            matmul.Config(bm=bm, bn=32, dot=True, nb=2, warps=4, codes=True),
            matmul.Config(bm=bm, bn=128, dot=True, nb=2, warps=8, codes=True)]


def expert_codes_grid() -> list:
    """Grouped code-dot launches (fp32 x) for a decode batch's experts: blocks of 16 pairs (32 GPT-OSS streams
    choose about 4 per expert), 64 weight rows with 4 and 8 warps, 128 with 8. Compiled for sm_90, MXFP4's take
    143, 103 and 128 registers, no spills."""
    from orcd_quant_formats.kernels import matmul

    return [matmul.Config(bm=16, bn=64, dot=True, nb=2, warps=4, codes=True),
            matmul.Config(bm=16, bn=64, dot=True, nb=2, warps=8, codes=True),
            matmul.Config(bm=16, bn=128, dot=True, nb=2, warps=8, codes=True)]


def _has_codes(fmt: QuantFormat, dtype: torch.dtype) -> bool:
    from orcd_quant_formats.kernels import codes_dot

    return dtype == torch.float32 and int(fmt.ggml_type) in codes_dot.TYPES


def _timed_grid(configs: list, default: object, call: Callable[[object], list], repeat: int) -> list[dict]:
    results = []
    for cfg in configs:
        try:
            seconds, _ = time_calls(call(cfg), repeat)
        except Exception as e:  # noqa: BLE001 -- the compiler may refuse a configuration (registers, shared memory)
            results.append({"config": asdict(cfg), "seconds": None, "error": str(e).splitlines()[0][:120]})
            continue
        results.append({"config": asdict(cfg), "seconds": seconds, "default": cfg is default})
    return results


def sweep(fmt: QuantFormat, n: int, k: int, m: int, dtype: torch.dtype, device: torch.device, repeat: int,
          rng: np.random.Generator) -> list[dict]:
    """Seconds per call of every launch configuration in a grid: decode kernel shapes for ``m <= 8``
    (``DECODE_MAX_ROWS``), tl.dot shapes for ``m > 1`` (both where they overlap, to place the switch between them)."""
    from orcd_quant_formats.kernels import matmul, tuning

    spec = matmul.SPECS[int(fmt.ggml_type)]
    bytes_one = n * fmt.row_bytes(k)
    weights = _weights(fmt, (n, k), _copies(bytes_one, device), device, rng)
    x = torch.randn(m, k, device=device, dtype=dtype)
    default = matmul.pick_config(spec, m, n, k, matmul._multiprocessors(device))
    grid = []
    if m <= matmul.DECODE_MAX_ROWS:
        grid += decode_grid(int(fmt.ggml_type), m, n, k, device)
    elif m <= tuning.TABLE_MAX_ROWS:
        grid += batch_decode_grid(m)
    if 1 < m <= tuning.TABLE_MAX_ROWS:
        grid += batch_dot_grid(m)
        if _has_codes(fmt, dtype):
            grid += codes_grid(m)
    elif m > 1:
        grid += [matmul.Config(bm=bm, bn=bn, dot=True, nb=nb, warps=warps)
                 for bm, bn in ((16, 64), (32, 64), (64, 64), (64, 128), (128, 128), (128, 256))
                 if bm <= max(16, 2 * m) for nb in (2, 4) for warps in (4, 8)]
        grid.append(matmul.Config(bm=128, bn=128, dot=True, nb=2, warps=8, stages=3))

    def calls(cfg: object) -> list:
        return [lambda w=w: matmul.linear(x, w.data, int(fmt.ggml_type), n, k, None, config=cfg) for w in weights]

    return _timed_grid([default, *grid], default, calls, repeat)


def sweep_moe(fmt: QuantFormat, dtype: torch.dtype, device: torch.device, repeat: int,
              rng: np.random.Generator, shape: tuple[int, int, int] = MOE_SHAPE, tokens: int = 1) -> list[dict]:
    """The rule's launch and the decode grid on ``tokens`` tokens' top-k experts (``bench_moe``'s setting), at the
    rows per block the launcher plans for that many pairs (``matmul.expert_rows``: 1 up to
    ``EXPERT_DECODE_MAX_PAIRS`` pairs, where every block is one pair; past it, where the rule takes tl.dot, the
    grid's grouped decode launches are its rival, and for fp32 x the grouped code dot's, ``expert_codes_grid``)."""
    from orcd_quant_formats.kernels import matmul

    n_expert, n, k = shape
    (weight,) = _weights(fmt, shape, 1, device, rng)
    ids = [torch.rand(tokens, n_expert, device=device).topk(MOE_TOP_K, dim=-1).indices for _ in range(16)]
    x = torch.randn(tokens, k, device=device, dtype=dtype)
    ggml_type = int(fmt.ggml_type)
    rows = matmul.expert_rows(tokens * MOE_TOP_K, n_expert)
    default = matmul.pick_config(matmul.SPECS[ggml_type], rows, n, k, matmul._multiprocessors(device))
    grid = decode_grid(ggml_type, rows, n, k, device) if rows <= matmul.DECODE_MAX_ROWS else []
    if rows > matmul.FMA_MAX_ROWS and _has_codes(fmt, dtype):  # grouped tl.dot by the rule: the code dot's rival
        grid += expert_codes_grid()

    def calls(cfg: object) -> list:
        return [lambda i=i: matmul.expert_linear(x, weight.data, ggml_type, n_expert, n, k, i, config=cfg)
                for i in ids]

    return _timed_grid([default, *grid], default, calls, repeat)


def expert_sweep_tokens(ms: Sequence[int], n_expert: int) -> dict[int, int]:
    """Tokens to sweep the experts at, one per distinct planned rows (``matmul.expert_rows``) that the decode kernel
    can take, from ``--m``: rows per block -> tokens (the first ``m`` giving those rows)."""
    from orcd_quant_formats.kernels import matmul

    chosen: dict[int, int] = {}
    for m in ms:
        rows = matmul.expert_rows(m * MOE_TOP_K, n_expert)
        if rows <= matmul.DECODE_MAX_ROWS:
            chosen.setdefault(rows, m)
    return chosen


def model_projections(path: str, device: torch.device, plugins: OrcdPluginManager
                      ) -> tuple[list[tuple[str, int, int]], list[tuple[str, tuple[int, int, int]]]]:
    """The quantized projections a model file's decode step launches, as the architecture builds them (fused QKV and
    gate|up included): distinct ``(type, N, K)`` of its linears and ``(type, (experts, N, K))`` of its expert
    tensors, in model order."""
    from orcd.loader import load_model

    module = load_model(path, device=device, plugins=plugins).module
    linears: dict[tuple[str, int, int], None] = {}
    experts: dict[tuple[str, tuple[int, int, int]], None] = {}
    for sub in module.modules():
        weight = getattr(sub, "weight", None)
        if not isinstance(weight, QuantizedTensor) or type(weight.fmt).linear is QuantFormat.linear:  # no fused kernel
            continue
        if len(weight.shape) == 2:
            linears[(weight.fmt.name, *weight.shape)] = None
        elif len(weight.shape) == 3:
            experts[(weight.fmt.name, tuple(weight.shape))] = None
    del module
    torch.cuda.empty_cache()
    return list(linears), list(experts)


def run(
    types: Sequence[str] = DEFAULT_TYPES,
    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES,
    ms: Sequence[int] = DEFAULT_M,
    dtype: torch.dtype = torch.float16,
    repeat: int = 20,
    moe: bool = True,
    do_sweep: bool = False,
    plugins: OrcdPluginManager | None = None,
    device: str = "cuda",
    seed: int = 0,
    model: str | None = None,
    on_sweep: Callable[[dict], None] | None = None,
) -> dict:
    """Every format in ``types`` at every shape in ``shapes`` (and GPT-OSS's expert tensor, with ``moe``); or, with
    ``model`` (a GGUF file), exactly the projections that model's decode step launches. ``on_sweep`` sees the
    report so far after each sweep (a long sweep cut short keeps what it measured)."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError("the kernel benchmark needs a CUDA device")
    plugins = plugins or get_plugin_manager()
    by_name = {f.name: f for f in plugins.quant_formats.values()}
    if model is not None:
        linears, experts = model_projections(model, dev, plugins)
    else:
        missing = [t for t in types if t not in by_name]
        if missing:
            raise ValueError(f"no registered format for {', '.join(missing)}")
        linears = [(name, n, k) for name in types for n, k in shapes if k % by_name[name].block_size == 0]
        experts = [("MXFP4", MOE_SHAPE)] if moe and "MXFP4" in by_name else []
    rng = np.random.default_rng(seed)
    copy_gbps = copy_bandwidth(dev)
    rows, sweeps = [], []

    def report() -> dict:
        return {"device_name": torch.cuda.get_device_name(dev), "dtype": str(dtype).removeprefix("torch."),
                "copy_gbps": copy_gbps, "rows": [asdict(r) for r in rows], "sweeps": sweeps}

    with torch.inference_mode():
        for name, n, k in linears:
            fmt = by_name[name]
            for m in ms:
                rows.append(bench_linear(fmt, n, k, m, dtype, dev, repeat, rng))
                if do_sweep:
                    sweeps.append({"type": name, "n": n, "k": k, "m": m,
                                   "results": sweep(fmt, n, k, m, dtype, dev, repeat, rng)})
                    if on_sweep:
                        on_sweep(report())
        for name, shape in experts:
            for tokens in MOE_TOKENS:
                rows.append(bench_moe(by_name[name], tokens, dtype, dev, repeat, rng, shape))
            if do_sweep:
                for planned, tokens in expert_sweep_tokens(ms, shape[0]).items():
                    sweeps.append({"type": name, "experts": True, "n": shape[1], "k": shape[2], "m": planned,
                                   "tokens": tokens,
                                   "results": sweep_moe(by_name[name], dtype, dev, repeat, rng, shape, tokens)})
                    if on_sweep:
                        on_sweep(report())
    return report()


def tuning_configs(report: dict) -> dict[str, dict]:
    """The fastest launch of each swept shape, keyed as ``orcd_quant_formats.kernels.tuning`` reads them. Up to
    ``FMA_MAX_ROWS`` rows, where the rule takes the decode kernel anyway, its fastest decode launch; past it, the
    fastest launch of either kernel, written only where it is not the rule's own (``default``). Sweeps whose rows
    the table has no key for (past ``TABLE_MAX_ROWS``, or between its buckets) give no entry."""
    from gguf import GGMLQuantizationType

    from orcd_quant_formats.kernels import tuning

    best = {}
    for s in report["sweeps"]:
        everything = [x for x in s["results"] if x["seconds"]]
        if s["m"] <= tuning.FMA_MAX_ROWS:  # the rule's kernel is the decode kernel: its fastest launch
            candidates = [x for x in everything if not x["config"]["dot"]]
        elif tuning.table_rows(s["m"]) == s["m"]:  # the fastest of all, where it is not the rule's own launch
            candidates = everything
        else:  # a batch the table has no key for (a prompt)
            continue
        if not candidates:
            continue
        fastest = min(candidates, key=lambda x: x["seconds"])
        rule = [x["config"] for x in s["results"] if x.get("default")]
        if s["m"] > tuning.FMA_MAX_ROWS and fastest["config"] in rule:  # the grid may time the rule's launch twice
            continue
        key = tuning.key(int(GGMLQuantizationType[s["type"]]), s["m"], s["n"], s["k"], s.get("experts", False))
        best[key] = fastest["config"]
    return best


def format_table(report: dict) -> str:
    copy = report["copy_gbps"]
    lines = [
        (f"{report['device_name']}, x {report['dtype']}; device-to-device copy {copy:.0f} GB/s (read + write); "
         "times per call from CUDA-graph replays, weights from device memory (copies > 4x L2)"),
        ("GB/s: weight bytes read per call / time (% of copy bandwidth); TFLOP/s: 2 M N K / time; "
         "ref = dequantize + torch.matmul"),
        (f"{'kind':<6} {'type':<6} {'N x K':>13} {'M':>4} {'MiB':>7} {'fused us':>9} {'GB/s':>6} {'%copy':>6} "
         f"{'TFLOP/s':>8} {'ref us':>9} {'ref GB/s':>8} {'ref TF/s':>8} {'x ref':>6}  note"),
    ]
    for r in report["rows"]:
        f, ref = r["fused_s"], r["reference_s"]
        gb = r["weight_bytes"] / f / 1e9 if f else None
        ref_gb = r["weight_bytes"] / ref / 1e9 if ref else None

        def num(v: float | None, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        lines.append(
            f"{r['kind']:<6} {r['type']:<6} {r['n']:>6}x{r['k']:<6} {r['m']:>4} {r['weight_bytes'] / 2**20:>7.1f} "
            f"{num(f and f * 1e6, '9.1f'):>9} {num(gb, '6.0f'):>6} {num(gb and gb / copy, '.0%'):>6} "
            f"{num(f and r['flops'] / f / 1e12, '8.1f'):>8} {num(ref and ref * 1e6, '9.1f'):>9} "
            f"{num(ref_gb, '8.0f'):>8} {num(ref and r['flops'] / ref / 1e12, '8.1f'):>8} "
            f"{num(f and ref and ref / f, '6.1f'):>6}  {r['note']}"
        )
    for s in report["sweeps"]:
        ok = sorted((x for x in s["results"] if x["seconds"]), key=lambda x: x["seconds"])
        default = next((x for x in s["results"] if x.get("default")), None)
        rank = ok.index(default) + 1 if default in ok else None
        kind = f" experts ({s.get('tokens', 1)} tokens)" if s.get("experts") else ""
        lines.append(f"sweep {s['type']}{kind} {s['n']}x{s['k']} M={s['m']}: default "
                     f"{default['seconds'] * 1e6 if default and default['seconds'] else float('nan'):.1f} us "
                     f"(rank {rank} of {len(ok)}); best:")
        for x in ok[:5]:
            lines.append(f"    {x['seconds'] * 1e6:8.1f} us  {x['config']}")
        for x in s["results"]:
            if x.get("error"):
                lines.append(f"    failed {x['config']}: {x['error']}")
    return "\n".join(lines)


def _shape(text: str) -> tuple[int, int]:
    n, k = text.lower().split("x")
    return int(n), int(k)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--types", default=",".join(DEFAULT_TYPES), help="comma-separated ggml type names")
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in DEFAULT_SHAPES),
                        help="weight shapes NxK (output rows x row length), comma-separated")
    parser.add_argument("--m", default=",".join(map(str, DEFAULT_M)), help="rows of x, comma-separated")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--repeat", type=int, default=20, help="timed graph replays per measurement (median)")
    parser.add_argument("--no-moe", action="store_true", help="skip the GPT-OSS mixture-of-experts rows")
    parser.add_argument("--model", metavar="FILE",
                        help="instead of --types/--shapes: the projections this GGUF model's decode step launches")
    parser.add_argument("--sweep", action="store_true", help="also time a grid of launch configurations")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    parser.add_argument("--matmul-precision", choices=MATMUL_PRECISIONS, default="highest", help=MATMUL_PRECISION_HELP)
    parser.add_argument("--tuning-out", metavar="FILE",
                        help="with --sweep: write the fastest decode launch of each shape as a kernel tuning table "
                             "(orcd_quant_formats/kernels/tuned/)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orcd.bench.kernels", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_args(parser.parse_args(argv))


def run_args(args: argparse.Namespace) -> int:
    """Run from parsed arguments (``main`` and ``orcd bench kernels``)."""
    set_matmul_precision(args.matmul_precision)
    def write_tuning(report: dict) -> None:
        from orcd_quant_formats.kernels import tuning

        tuning.write(args.tuning_out, report["device_name"], tuning_configs(report))
        if report["sweeps"]:  # progress, for a run that may be cut short
            last = report["sweeps"][-1]
            timed = [r for r in last["results"] if r["seconds"]]
            rule = next((f"{r['seconds'] * 1e6:.1f} us" for r in timed if r.get("default")), "did not run")
            best = min(timed, key=lambda r: r["seconds"]) if timed else None
            print(f"swept {last['type']} {last['n']}x{last['k']} M={last['m']}: rule's launch {rule}; best "
                  + (f"{best['seconds'] * 1e6:.1f} us {best['config']}" if best else "none ran"),
                  file=sys.stderr, flush=True)

    report = run(
        types=[t.strip().upper() for t in args.types.split(",") if t.strip()],
        shapes=[_shape(s) for s in args.shapes.split(",") if s.strip()],
        ms=[int(m) for m in args.m.split(",")],
        dtype=getattr(torch, args.dtype), repeat=args.repeat, moe=not args.no_moe, do_sweep=args.sweep,
        model=args.model, on_sweep=write_tuning if args.tuning_out else None,
    )
    if args.tuning_out:
        write_tuning(report)
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print(format_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
