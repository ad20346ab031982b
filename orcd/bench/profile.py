"""Where a decode step's time goes: ``orcd bench profile --model FILE [--streams N] [--steps 64] [--no-cuda-graphs]``
(``--prefill``: where one prompt pass's time goes).

It runs the engine as ``orcd bench model`` does (greedy, end-of-generation disabled, ``N`` streams decoding
together), lets the first steps warm up (prefill, kernel compiles, graph captures), then records ``--steps``
engine steps under ``torch.profiler`` and prints one table: wall time per step, the device's busy time per step
(the sum of its kernels and copies, so the rest of the step is host time the device waits for), and the kernels that
take the most device time per step. This is the profile the performance targets ask for where one is missed.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from orcd.device import MATMUL_PRECISION_HELP, MATMUL_PRECISIONS, set_matmul_precision


@dataclass
class KernelRow:
    name: str
    calls_per_step: float
    us_per_step: float


@dataclass
class StepProfile:
    steps: int
    streams: int
    wall_us: float  # per engine step
    device_us: float  # kernels and copies per step
    kernels: list[KernelRow]
    host_ops: list[KernelRow]  # operators by self CPU time per step (what the host spends the step on)
    prompt_tokens: int = 0  # a prompt pass's profile (``profile_prefill``): its prompt length; 0 for decode steps


def _short(name: str, width: int = 90) -> str:
    name = " ".join(name.split())
    return name if len(name) <= width else name[: width - 1] + "…"


def profile_decode(path: str, device: str, prompt_tokens: int, steps: int, streams: int, graphs: bool,
                   overlap: bool = True, warmup_steps: int = 8) -> StepProfile:
    from orcd.bench.model import engine_options, random_prompt
    from orcd.engine import Engine, GenerationRequest
    from orcd.loader import load_model
    from orcd.plugins import get_plugin_manager
    from orcd.sampling import SamplingParams

    plugins = get_plugin_manager()
    loaded = load_model(path, device=device, plugins=plugins)
    max_tokens = warmup_steps + steps + 2
    engine = Engine(loaded, plugins, max_batch=streams, n_ctx=prompt_tokens + max_tokens,
                    **engine_options(device, graphs, overlap))
    for n in range(streams):
        engine.add_request(GenerationRequest(
            request_id=f"p{n}", prompt_ids=random_prompt(loaded.tokenizer, prompt_tokens, seed=n),
            max_tokens=max_tokens, sampling=SamplingParams(temperature=0.0), stop_token_ids=set()))
    for _ in range(warmup_steps):  # admission and prefill happen in the first step; graphs are captured here
        engine.step()
    return _record(engine.step, steps, streams, torch.device(device))


def profile_prefill(path: str, device: str, prompt_tokens: int, graphs: bool = True) -> StepProfile:
    """Where one prompt pass's time goes: a first request warms up (compiles, allocations), then the engine steps
    of a second one are recorded up to its first token (one step unless the prompt is chunked)."""
    from orcd.bench.model import engine_options, random_prompt
    from orcd.engine import Engine, GenerationRequest, TokenEvent
    from orcd.loader import load_model
    from orcd.plugins import get_plugin_manager
    from orcd.sampling import SamplingParams

    plugins = get_plugin_manager()
    loaded = load_model(path, device=device, plugins=plugins)
    engine = Engine(loaded, plugins, max_batch=1, n_ctx=prompt_tokens + 2, **engine_options(device, graphs))

    def request(seed: int) -> GenerationRequest:
        return GenerationRequest(request_id=f"p{seed}", prompt_ids=random_prompt(loaded.tokenizer, prompt_tokens,
                                                                                seed=seed),
                                 max_tokens=2, sampling=SamplingParams(temperature=0.0), stop_token_ids=set())

    list(engine.generate(request(0)))  # warm-up: kernels compiled, memory allocated
    engine.add_request(request(1))
    steps = 0

    def until_first_token() -> None:
        nonlocal steps
        while True:
            steps += 1
            if any(isinstance(e, TokenEvent) for e in engine.step()):
                return

    prof = _record(until_first_token, 1, 1, torch.device(device))
    return StepProfile(steps, prof.streams, prof.wall_us / steps, prof.device_us / steps,
                       [KernelRow(k.name, k.calls_per_step / steps, k.us_per_step / steps) for k in prof.kernels],
                       [KernelRow(k.name, k.calls_per_step / steps, k.us_per_step / steps) for k in prof.host_ops],
                       prompt_tokens=prompt_tokens)


def _record(step, steps: int, streams: int, dev: torch.device) -> StepProfile:
    """``steps`` calls of ``step`` under ``torch.profiler``, summed per kernel and per host operator."""
    from torch.profiler import ProfilerActivity, profile

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        wall = time.perf_counter() - started
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    busy = 0.0
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        row = per_kernel[ev.name]
        row[0] += 1
        row[1] += ev.device_time_total
        busy += ev.device_time_total
    kernels = sorted((KernelRow(_short(name), n / steps, us / steps) for name, (n, us) in per_kernel.items()),
                     key=lambda r: -r.us_per_step)
    host_ops = sorted((KernelRow(_short(a.key), a.count / steps, a.self_cpu_time_total / steps)
                       for a in prof.key_averages() if a.self_cpu_time_total > 0), key=lambda r: -r.us_per_step)
    return StepProfile(steps, streams, wall * 1e6 / steps, busy / steps, kernels, host_ops)


def format_profile(p: StepProfile, path: str, top: int = 25) -> str:
    host_only = max(0.0, p.wall_us - p.device_us)
    tokens = p.prompt_tokens or p.streams
    what = (f"a {p.prompt_tokens}-token prompt pass in {p.steps} step(s)" if p.prompt_tokens
            else f"{p.steps} decode steps of {p.streams} stream(s)")
    rows = [f"model {path}: {what}",
            (f"wall {p.wall_us:.0f} us/step ({tokens * 1e6 / p.wall_us:.0f} tok/s); device busy {p.device_us:.0f} "
             f"us/step ({100 * p.device_us / p.wall_us:.0f}%); host-only time {host_only:.0f} us/step"),
            f"{'us/step':>9} {'share':>6} {'calls/step':>10}  kernel"]
    for k in p.kernels[:top]:
        share = 100 * k.us_per_step / p.device_us if p.device_us else 0.0
        rows.append(f"{k.us_per_step:>9.1f} {share:>5.1f}% {k.calls_per_step:>10.1f}  {k.name}")
    if len(p.kernels) > top:
        rest = sum(k.us_per_step for k in p.kernels[top:])
        rows.append(f"{rest:>9.1f} {'':>6} {'':>10}  ({len(p.kernels) - top} more kernels)")
    rows.append(f"{'us/step':>9} {'':>6} {'calls/step':>10}  host operator (self CPU time)")
    for k in p.host_ops[: max(5, top // 2)]:
        rows.append(f"{k.us_per_step:>9.1f} {'':>6} {k.calls_per_step:>10.1f}  {k.name}")
    return "\n".join(rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="FILE")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=64, help="decode steps recorded after the warm-up")
    p.add_argument("--streams", type=int, default=1, help="sequences decoding together")
    p.add_argument("--top", type=int, default=25, help="kernels listed")
    p.add_argument("--no-cuda-graphs", dest="graphs", action="store_false", help="decode eagerly on CUDA")
    p.add_argument("--no-overlap", dest="overlap", action="store_false", help="no step ahead (Engine(overlap=False))")
    p.add_argument("--prefill", action="store_true", help="profile one prompt pass instead of decode steps")
    p.add_argument("--matmul-precision", choices=MATMUL_PRECISIONS, default="highest", help=MATMUL_PRECISION_HELP)


def run_args(args: argparse.Namespace) -> int:
    set_matmul_precision(args.matmul_precision)
    if args.steps < 1 or args.streams < 1:
        raise SystemExit("--steps and --streams must be at least 1")
    if args.prefill:
        result = profile_prefill(args.model, args.device, args.prompt_tokens, args.graphs)
    else:
        result = profile_decode(args.model, args.device, args.prompt_tokens, args.steps, args.streams, args.graphs,
                                args.overlap)
    print(format_profile(result, args.model, args.top))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orcd.bench.profile", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run_args(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
