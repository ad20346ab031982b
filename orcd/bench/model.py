"""Model throughput: prompt processing, batch-1 decode, time to first token and device memory — for orcd and, in the
same run on the same file, llama.cpp (through ``llama-cpp-python``) when it is installed.

``orcd bench model --model FILE [--device cuda] [--prompt-tokens 512] [--decode-tokens 128] [--streams 1,8,32]
[--peer llama.cpp,transformers] [--json]``

Both engines get the same random prompt (token ids drawn from the non-special part of the vocabulary). orcd runs its
engine greedily with end-of-generation tokens disabled so exactly ``--decode-tokens`` tokens are produced; llama.cpp
evaluates the prompt, then one token at a time the same number of times (the token fed does not change the work).
Decode tokens/s counts the tokens after the first (the first comes out of the prompt pass), as llama.cpp does.
With ``--streams N`` (N > 1) orcd runs N requests at once through the engine's batched step and reports the
aggregate decode tokens/s from the moment every stream has its first token to the end. The bandwidth limit of N
streams is N tokens over the time the device's copy bandwidth takes to read the bytes one decode step of them must
read: the weights they touch, once — for a mixture of experts only the experts they select, at N > 1 the share
that uniform routing would select (``expert_share``) — plus each stream's KV cache (a sliding window's part of it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass

import numpy as np
import torch

from orcd.device import MATMUL_PRECISION_HELP, MATMUL_PRECISIONS, set_matmul_precision


@dataclass
class ModelResult:
    engine: str
    device: str
    prompt_tokens: int
    decode_tokens: int
    load_s: float
    ttft_s: float  # prompt pass + first token
    prompt_tok_s: float
    decode_tok_s: float
    memory_bytes: int | None  # device memory held after load (weights + caches); None where not measurable
    peak_bytes: int | None


def random_prompt(tokenizer, n: int, seed: int = 0) -> list[int]:
    special = set(tokenizer.special_ids)
    pool = np.array([i for i in range(tokenizer.vocab_size) if i not in special])
    return np.random.default_rng(seed).choice(pool, size=n).tolist()


_LOADED: dict[tuple[str, str], object] = {}


def _load(path: str, device: str, plugins) -> object:
    """The model of ``path`` on ``device``, loaded once per process: the batch-1 run and the stream runs share it
    (GPT-OSS-20B takes ~20 s to load). A peer loads its own copy beside it."""
    from orcd.loader import load_model

    key = (os.path.abspath(path), device)
    if key not in _LOADED:
        _LOADED.clear()  # one model at a time
        _LOADED[key] = load_model(path, device=device, plugins=plugins)
    return _LOADED[key]


def engine_options(device: str, graphs: bool, overlap: bool = True) -> dict:
    """No prefix cache (repeats of one prompt would hit it and time nothing); CUDA graphs and the step ahead
    (``Engine(overlap=...)``) on a GPU unless off."""
    cuda = device.startswith("cuda")
    return {"prefix_cache": False, "cuda_graphs": graphs and cuda, "overlap": overlap and cuda}


def bench_orcd(path: str, device: str, prompt_tokens: int, decode_tokens: int, repeat: int,
               graphs: bool = True, overlap: bool = True) -> ModelResult:
    from orcd.engine import Engine, FinishEvent, GenerationRequest
    from orcd.plugins import get_plugin_manager
    from orcd.sampling import SamplingParams

    plugins = get_plugin_manager()
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    loaded = _load(path, device, plugins)
    ids = random_prompt(loaded.tokenizer, prompt_tokens)
    engine = Engine(loaded, plugins, max_batch=1, n_ctx=prompt_tokens + decode_tokens,
                    **engine_options(device, graphs, overlap))
    memory = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else None
    best: FinishEvent | None = None
    for i in range(repeat + 1):  # the first run warms up (allocator, kernels, autotuning)
        req = GenerationRequest(request_id=uuid.uuid4().hex, prompt_ids=ids, max_tokens=decode_tokens,
                                sampling=SamplingParams(temperature=0.0), stop_token_ids=set())
        finish = [e for e in engine.generate(req) if isinstance(e, FinishEvent)][0]
        if finish.error is not None:
            raise finish.error
        if i and (best is None or finish.decode_time_s < best.decode_time_s):
            best = finish
    assert best is not None and best.completion_tokens == decode_tokens
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    return ModelResult("orcd", str(dev), prompt_tokens, decode_tokens, loaded.load_seconds,
                       best.time_to_first_token_s, prompt_tokens / best.time_to_first_token_s,
                       (decode_tokens - 1) / best.decode_time_s, memory, peak)


def bench_orcd_streams(path: str, device: str, prompt_tokens: int, decode_tokens: int, streams: int,
                       graphs: bool = True, overlap: bool = True) -> ModelResult:
    """``streams`` requests decoding together: aggregate decode tokens/s once all have their first token."""
    from orcd.engine import Engine, FinishEvent, GenerationRequest, TokenEvent
    from orcd.plugins import get_plugin_manager
    from orcd.sampling import SamplingParams

    plugins = get_plugin_manager()
    loaded = _load(path, device, plugins)
    engine = Engine(loaded, plugins, max_batch=streams, n_ctx=prompt_tokens + decode_tokens,
                    **engine_options(device, graphs, overlap))
    best = None
    for i in range(2):  # a warm-up round, then the measured one
        for n in range(streams):
            engine.add_request(GenerationRequest(
                request_id=f"s{i}-{n}", prompt_ids=random_prompt(loaded.tokenizer, prompt_tokens, seed=n),
                max_tokens=decode_tokens, sampling=SamplingParams(temperature=0.0), stop_token_ids=set()))
        started, first_all, firsts, generated, done = time.perf_counter(), None, set(), 0, 0
        while done < streams:
            for event in engine.step():
                if isinstance(event, TokenEvent):
                    firsts.add(event.request_id)
                    if first_all is not None:
                        generated += 1
                elif isinstance(event, FinishEvent):
                    if event.error is not None:
                        raise event.error
                    done += 1
            if first_all is None and len(firsts) == streams:
                first_all = time.perf_counter()
        _sync(torch.device(device))
        elapsed = time.perf_counter() - (first_all or started)
        best = (first_all - started, generated / elapsed)
    peak = torch.cuda.max_memory_allocated(torch.device(device)) if device.startswith("cuda") else None
    return ModelResult(f"orcd x{streams}", device, prompt_tokens, decode_tokens, loaded.load_seconds, best[0],
                       streams * prompt_tokens / best[0], best[1], None, peak)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


EMBEDDING = "token_embd.weight"
OUTPUT = "output.weight"


def expert_share(total: int, used: int, streams: int) -> float:
    """The expected share of a layer's experts that ``streams`` tokens select together, each token ``used`` distinct
    experts of ``total``, uniformly and independently: an expert is left out by all with chance
    ``(1 - used / total) ** streams``. A real router is not uniform (a skewed one selects fewer); at one stream this is
    exactly ``used / total``."""
    if streams == 1:
        return used / total
    return 1.0 - (1.0 - used / total) ** streams


def bytes_per_step(path: str, context_tokens: int, streams: int = 1) -> int:
    """Bytes one decode step of ``streams`` sequences, each ``context_tokens`` long, must read: every weight they use,
    once, and each one's KV cache. Of the expert tensors, the share the step's tokens select (``expert_share``); of
    the token embedding, one row a stream, unless the output head is tied to it (no ``output.weight``), when the head
    reads all of it."""
    from orcd.description import open_checked
    from orcd.plugins import get_plugin_manager

    model, config = open_checked(path, get_plugin_manager())
    used = getattr(config, "expert_used_count", 0)
    total = getattr(config, "expert_count", 0)
    weights = 0
    for t in model.tensors.values():
        expert = total and len(t.shape) >= 2 and t.shape[0] == total and "_exps" in t.name
        if expert and streams == 1:
            weights += t.n_bytes * used // total  # exact: an expert tensor is total equal slices
        elif expert:
            weights += round(t.n_bytes * expert_share(total, used, streams))
        elif t.name == EMBEDDING and OUTPUT in model.tensors:
            weights += min(streams, t.shape[0]) * (t.n_bytes // t.shape[0])  # the tokens' rows
        else:
            weights += t.n_bytes
    return weights + streams * config.kv_read_bytes(context_tokens)


def bytes_per_token(path: str, context_tokens: int) -> int:
    """Bytes one batch-1 decode step reads (``bytes_per_step`` of one stream)."""
    return bytes_per_step(path, context_tokens, 1)


@dataclass
class BandwidthLimit:
    """The decode rate at which ``streams`` sequences would read ``bytes_per_step`` at the device's copy bandwidth."""

    streams: int
    bytes_per_step: int
    copy_gbps: float

    @property
    def tok_s(self) -> float:
        return self.streams * self.copy_gbps * 1e9 / self.bytes_per_step


def bench_transformers(path: str, device: str, prompt_tokens: int, decode_tokens: int, prompt: list[int]) -> ModelResult:
    """Hugging Face transformers loading the same GGUF (it dequantizes to bf16) and generating greedily."""
    import transformers

    p = os.path.abspath(path)
    started = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p),
                                                              dtype=torch.bfloat16).to(device).eval()
    load_s = time.perf_counter() - started
    ids = torch.tensor([prompt], device=device)
    dev = torch.device(device)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        _sync(dev)
        t0 = time.perf_counter()
        model(ids)
        _sync(dev)
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False)
        _sync(dev)
        t2 = time.perf_counter()
    prompt_s = t1 - t0
    decode_s = max(t2 - t1 - prompt_s, 1e-9)  # generate re-runs the prompt pass first
    memory = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else None
    return ModelResult("transformers", device, prompt_tokens, decode_tokens, load_s, prompt_s,
                       prompt_tokens / prompt_s, (decode_tokens - 1) / decode_s, memory, None)


def bench_llama_cpp(path: str, device: str, prompt_tokens: int, decode_tokens: int, repeat: int,
                    prompt: list[int], timeout_s: float = 600.0) -> ModelResult:
    """llama.cpp in a child process (``orcd.bench.llama_cpp_peer``). Loaded in orcd's process after orcd's
    CUDA-graph runs, on an H100, it ended the process with a segmentation fault (cause not found; alone it ran), and
    a peer that crashes must not take orcd's figures with it. A child that crashes or outlasts ``timeout_s`` raises
    here, and ``run_args`` prints that instead of the peer's row."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="orcd-llama-") as tmp:
        request = os.path.join(tmp, "request.json")
        with open(request, "w") as f:
            json.dump({"path": path, "device": device, "prompt_tokens": prompt_tokens,
                       "decode_tokens": decode_tokens, "repeat": repeat, "prompt": prompt}, f)
        log = os.path.join(tempfile.gettempdir(), f"llama-cpp-{uuid.uuid4().hex[:8]}.log")
        with open(log, "w") as err:
            done = subprocess.run([sys.executable, "-m", "orcd.bench.llama_cpp_peer", request], stdout=subprocess.PIPE,
                                  stderr=err, text=True, timeout=timeout_s)
    if done.returncode != 0:
        how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit status {done.returncode}"
        raise RuntimeError(f"the llama.cpp process ended with {how} (its log: {log})")
    if "llama_cpp is not installed" in done.stdout:
        raise ImportError(done.stdout.strip())
    return ModelResult(**json.loads(done.stdout.strip().splitlines()[-1]))


def format_table(results: list[ModelResult], path: str, limits: dict[int, BandwidthLimit] | None = None) -> str:
    """One row per engine and stream count; then orcd's ratios (streams against batch 1, orcd against each peer)
    and, where ``limits`` gives the bandwidth limit of a stream count, the share of it orcd reached."""
    limits = limits or {}
    head = f"{'engine':<12} {'device':<7} {'load s':>7} {'TTFT ms':>8} {'prompt tok/s':>13} {'decode tok/s':>13} {'memory MiB':>11} {'peak MiB':>9}"
    rows = [f"model {path}; fp32 matmul precision {torch.get_float32_matmul_precision()}", head]
    for r in results:
        mem = f"{r.memory_bytes / 2**20:.0f}" if r.memory_bytes is not None else "-"
        peak = f"{r.peak_bytes / 2**20:.0f}" if r.peak_bytes is not None else "-"
        rows.append(f"{r.engine:<12} {r.device:<7} {r.load_s:>7.2f} {r.ttft_s * 1000:>8.1f} {r.prompt_tok_s:>13.1f} "
                    f"{r.decode_tok_s:>13.1f} {mem:>11} {peak:>9}")
    base = results[0]
    for r in results[1:]:
        if r.engine.startswith("orcd"):
            rows.append(f"{r.engine}: aggregate decode {r.decode_tok_s / base.decode_tok_s:.1f}x batch 1")
            continue
        rows.append(f"orcd / {r.engine} on {r.device}: decode {base.decode_tok_s / r.decode_tok_s:.2f}x, "
                    f"prompt {base.prompt_tok_s / r.prompt_tok_s:.2f}x")
    reached = {_streams(r.engine): r.decode_tok_s for r in results if r.engine.startswith("orcd")}
    for n, limit in sorted(limits.items()):
        line = (f"bandwidth limit, {'batch 1' if n == 1 else f'{n} streams'}: "
                f"{limit.bytes_per_step / 2**20:.1f} MiB read per step / {limit.copy_gbps:.0f} GB/s = "
                f"{limit.tok_s:.0f} tok/s")
        if n > 1 and 1 in limits:  # what N streams could gain over batch 1 at the same share of the bandwidth
            line += f" ({limit.tok_s / limits[1].tok_s:.1f}x batch 1's)"
        if n in reached:
            line += f"; orcd reaches {100 * reached[n] / limit.tok_s:.1f}%"
        rows.append(line)
    return "\n".join(rows)


def _streams(engine: str) -> int:
    """1 for ``orcd``, N for ``orcd xN``."""
    return int(engine.split(" x")[1]) if " x" in engine else 1


def bandwidth_limits(path: str, context_tokens: int, streams: list[int], copy_gbps: float) -> dict[int, BandwidthLimit]:
    """The bandwidth limit of each stream count, every sequence ``context_tokens`` long."""
    return {n: BandwidthLimit(n, bytes_per_step(path, context_tokens, n), copy_gbps) for n in streams}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="FILE")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=2, help="timed runs after one warm-up (the best is reported)")
    p.add_argument("--no-cuda-graphs", dest="graphs", action="store_false", help="decode eagerly on CUDA")
    p.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="read every step's tokens before launching the next (no step ahead)")
    p.add_argument("--streams", default="1", help="comma-separated concurrent stream counts for orcd, e.g. 1,8,32")
    p.add_argument("--peer", default="llama.cpp",
                   help="peers measured in the same run: llama.cpp, transformers, both comma-separated, or none")
    p.add_argument("--peer-device", default=None, help="llama.cpp's device (default: the same as orcd's)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--matmul-precision", choices=MATMUL_PRECISIONS, default="highest", help=MATMUL_PRECISION_HELP)


def _measured(results: list[ModelResult], result: ModelResult) -> None:
    """Keep ``result`` and say it at once on stderr: a run stopped by a time limit (a slow peer) still leaves
    what it measured before."""
    results.append(result)
    print(f"measured {result.engine} ({result.device}): TTFT {result.ttft_s * 1000:.1f} ms, prompt "
          f"{result.prompt_tok_s:.1f} tok/s, decode {result.decode_tok_s:.1f} tok/s", file=sys.stderr, flush=True)


def run_args(args: argparse.Namespace) -> int:
    set_matmul_precision(args.matmul_precision)
    results: list[ModelResult] = []
    _measured(results, bench_orcd(args.model, args.device, args.prompt_tokens, args.decode_tokens, args.repeat,
                                  args.graphs, args.overlap))
    for n in (int(x) for x in args.streams.split(",")):
        if n <= 1:
            continue
        try:
            _measured(results, bench_orcd_streams(args.model, args.device, args.prompt_tokens, args.decode_tokens,
                                                  n, args.graphs, args.overlap))
        except Exception as e:  # a failed stream run is a finding to print, not a reason to lose the peers' figures
            print(f"orcd x{n} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                  file=sys.stderr, flush=True)
    limits: dict[int, BandwidthLimit] = {}
    if args.device.startswith("cuda"):
        from orcd.bench.dequant import copy_bandwidth

        counts = sorted({1} | {int(x) for x in args.streams.split(",") if int(x) > 1})
        # a step's sequences are half-way through their decode tokens on average
        limits = bandwidth_limits(args.model, args.prompt_tokens + args.decode_tokens // 2, counts,
                                  copy_bandwidth(torch.device(args.device)))
        for n, limit in limits.items():
            print(f"bandwidth limit at {n} stream(s): {limit.bytes_per_step / 2**20:.1f} MiB per step / "
                  f"{limit.copy_gbps:.0f} GB/s = {limit.tok_s:.0f} tok/s", file=sys.stderr, flush=True)
    peers = [p for p in args.peer.split(",") if p and p != "none"]
    if peers:
        from orcd.modelfile import ModelFile
        from orcd.tokenizer import Tokenizer

        prompt = random_prompt(Tokenizer.from_gguf(ModelFile.open(args.model)), args.prompt_tokens)
    for peer in peers:
        device = args.peer_device or args.device
        try:
            if peer == "llama.cpp":
                _measured(results, bench_llama_cpp(args.model, device, args.prompt_tokens, args.decode_tokens,
                                                   args.repeat, prompt))
            elif peer == "transformers":
                _measured(results, bench_transformers(args.model, device, args.prompt_tokens, args.decode_tokens,
                                                      prompt))
            else:
                print(f"unknown peer {peer!r}", file=sys.stderr)
        except ImportError as e:
            print(f"{peer} is not installed: no {peer} figure in this run ({e})", file=sys.stderr)
        except Exception as e:  # a peer that cannot load the file must not hide orcd's figures
            print(f"{peer} failed on this file: {type(e).__name__}: {e}", file=sys.stderr)
    if args.json:
        print(json.dumps({"results": [asdict(r) for r in results],
                          "bandwidth_limits": [{**asdict(limit), "tok_s": limit.tok_s}
                                               for limit in limits.values()]}, indent=1))
    else:
        print(format_table(results, args.model, limits))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orcd.bench.model", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run_args(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
