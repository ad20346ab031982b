"""Model throughput: prompt processing, batch-1 decode, time to first token and device memory — for orcd and, in the
same run on the same file, llama.cpp (through ``llama-cpp-python``) when it is installed.

``orcd bench model --model FILE [--device cuda] [--prompt-tokens 512] [--decode-tokens 128] [--json]``

Both engines get the same random prompt (token ids drawn from the non-special part of the vocabulary). orcd runs its
engine greedily with end-of-generation tokens disabled so exactly ``--decode-tokens`` tokens are produced; llama.cpp
evaluates the prompt, then one token at a time the same number of times (the token fed does not change the work).
Decode tokens/s counts the tokens after the first (the first comes out of the prompt pass), as llama.cpp does.
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


def bench_orcd(path: str, device: str, prompt_tokens: int, decode_tokens: int, repeat: int) -> ModelResult:
    from orcd.engine import Engine, FinishEvent, GenerationRequest
    from orcd.loader import load_model
    from orcd.plugins import get_plugin_manager
    from orcd.sampling import SamplingParams

    plugins = get_plugin_manager()
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    loaded = load_model(path, device=device, plugins=plugins)
    ids = random_prompt(loaded.tokenizer, prompt_tokens)
    engine = Engine(loaded, plugins, max_batch=1, n_ctx=prompt_tokens + decode_tokens)
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


def bench_llama_cpp(path: str, device: str, prompt_tokens: int, decode_tokens: int, repeat: int,
                    prompt: list[int]) -> ModelResult:
    import llama_cpp

    gpu = device.startswith("cuda")
    log = tempfile.NamedTemporaryFile(prefix="llama-cpp-", suffix=".log", delete=False)
    # llama.cpp writes its log to fd 2; keep it out of the table (verbose=False crashes some builds, see NOTES).
    saved = os.dup(2)
    os.dup2(log.fileno(), 2)
    try:
        started = time.perf_counter()
        llm = llama_cpp.Llama(path, n_ctx=prompt_tokens + decode_tokens, n_batch=prompt_tokens,
                              n_gpu_layers=-1 if gpu else 0, flash_attn=gpu, verbose=True)
        load_s = time.perf_counter() - started
        best = None
        for i in range(repeat + 1):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt)
            t1 = time.perf_counter()
            for j in range(decode_tokens - 1):
                llm.eval([prompt[j % len(prompt)]])
            t2 = time.perf_counter()
            if i and (best is None or t2 - t1 < best[1]):
                best = (t1 - t0, t2 - t1)
        llm.close()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    prompt_s, decode_s = best
    return ModelResult("llama.cpp", "cuda" if gpu else "cpu", prompt_tokens, decode_tokens, load_s, prompt_s,
                       prompt_tokens / prompt_s, (decode_tokens - 1) / decode_s, None, None)


def format_table(results: list[ModelResult], path: str) -> str:
    head = f"{'engine':<10} {'device':<7} {'load s':>7} {'TTFT ms':>8} {'prompt tok/s':>13} {'decode tok/s':>13} {'memory MiB':>11} {'peak MiB':>9}"
    rows = [f"model {path}", head]
    for r in results:
        mem = f"{r.memory_bytes / 2**20:.0f}" if r.memory_bytes is not None else "-"
        peak = f"{r.peak_bytes / 2**20:.0f}" if r.peak_bytes is not None else "-"
        rows.append(f"{r.engine:<10} {r.device:<7} {r.load_s:>7.2f} {r.ttft_s * 1000:>8.1f} {r.prompt_tok_s:>13.1f} "
                    f"{r.decode_tok_s:>13.1f} {mem:>11} {peak:>9}")
    base = results[0]
    for r in results[1:]:
        rows.append(f"orcd / {r.engine} on {r.device}: decode {base.decode_tok_s / r.decode_tok_s:.2f}x, "
                    f"prompt {base.prompt_tok_s / r.prompt_tok_s:.2f}x")
    return "\n".join(rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="FILE")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=2, help="timed runs after one warm-up (the best is reported)")
    p.add_argument("--peer", choices=["llama.cpp", "none"], default="llama.cpp",
                   help="measure llama.cpp in the same run (default, when llama-cpp-python is installed)")
    p.add_argument("--peer-device", default=None, help="llama.cpp's device (default: the same as orcd's)")
    p.add_argument("--json", action="store_true")


def run_args(args: argparse.Namespace) -> int:
    results = [bench_orcd(args.model, args.device, args.prompt_tokens, args.decode_tokens, args.repeat)]
    if args.peer == "llama.cpp":
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama-cpp-python is not installed: no peer in this run", file=sys.stderr)
        else:
            from orcd.modelfile import ModelFile
            from orcd.tokenizer import Tokenizer

            prompt = random_prompt(Tokenizer.from_gguf(ModelFile.open(args.model)), args.prompt_tokens)
            results.append(bench_llama_cpp(args.model, args.peer_device or args.device, args.prompt_tokens,
                                           args.decode_tokens, args.repeat, prompt))
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=1))
    else:
        print(format_table(results, args.model))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orcd.bench.model", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run_args(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
