"""llama.cpp's figures for ``orcd bench model``, measured in a process of their own.

``python -m orcd.bench.llama_cpp_peer REQUEST.json`` loads the file through ``llama-cpp-python`` (every layer on
the GPU and flash attention when the device is CUDA), evaluates the prompt, then one token at a time
``decode_tokens - 1`` times (the token fed does not change the work), ``repeat`` timed runs after a warm-up, and
prints one JSON line: the fields of ``orcd.bench.model.ModelResult``. llama.cpp's own log goes to stderr (the
parent sends it to a file): ``verbose=False`` crashes some builds (``../shared/device/NOTES.md``).

GPU memory is the device's free memory (``nvidia-smi``) before the load less after it (``memory_bytes``: weights, KV
cache and the compute buffers llama.cpp reserves at load) and less its lowest reading after the timed runs
(``peak_bytes``). The parent holds its own memory still while it waits, so the difference is this process's; what
llama.cpp allocates and frees between the readings is not seen.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def _gpu_index(device: str) -> str:
    """The ``nvidia-smi -i`` name of torch device ``device`` ("cuda", "cuda:N"), through ``CUDA_VISIBLE_DEVICES``."""
    ordinal = int(device.partition(":")[2] or 0)
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[ordinal] if ordinal < len(visible) else str(ordinal)


def _free_bytes(device: str) -> int | None:
    """The GPU's free memory as the driver reports it (``nvidia-smi``, MiB resolution), or None off CUDA or without
    ``nvidia-smi``. Read from another process: torch loaded beside llama.cpp made the process abort on an H100
    (``free(): invalid pointer``, signal 6, 2026-12-07), so nothing but llama.cpp loads CUDA libraries here."""
    if not device.startswith("cuda"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i",
                              _gpu_index(device)], capture_output=True, text=True, timeout=30, check=True).stdout
        return int(out.split()[0]) << 20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def measure(path: str, device: str, prompt_tokens: int, decode_tokens: int, repeat: int, prompt: list[int]) -> dict:
    import llama_cpp

    gpu = device.startswith("cuda")
    free_before = _free_bytes(device)
    started = time.perf_counter()
    llm = llama_cpp.Llama(path, n_ctx=prompt_tokens + decode_tokens, n_batch=prompt_tokens,
                          n_gpu_layers=-1 if gpu else 0, flash_attn=gpu, verbose=True)
    load_s = time.perf_counter() - started
    free_loaded = _free_bytes(device)
    best = None
    for i in range(repeat + 1):  # the first run warms up
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for j in range(decode_tokens - 1):
            llm.eval([prompt[j % len(prompt)]])
        t2 = time.perf_counter()
        if i and (best is None or t2 - t1 < best[1]):
            best = (t1 - t0, t2 - t1)
    free_after = _free_bytes(device)
    llm.close()
    prompt_s, decode_s = best
    return {"engine": "llama.cpp", "device": "cuda" if gpu else "cpu", "prompt_tokens": prompt_tokens,
            "decode_tokens": decode_tokens, "load_s": load_s, "ttft_s": prompt_s,
            "prompt_tok_s": prompt_tokens / prompt_s,
            "decode_tok_s": (decode_tokens - 1) / decode_s,
            "memory_bytes": None if None in (free_before, free_loaded) else free_before - free_loaded,
            "peak_bytes": None if None in (free_before, free_loaded, free_after)
            else free_before - min(free_loaded, free_after)}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    with open(args[0]) as f:
        request = json.load(f)
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        print(f"llama_cpp is not installed: {e}")
        return 0
    print(json.dumps(measure(**request)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
