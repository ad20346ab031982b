"""llama.cpp's greedy continuation, in a process without torch: ``python tests/llama_greedy.py REQUEST.json`` prints
the token ids as one JSON line. ``REQUEST`` holds ``path``, ``prompt`` (token ids), ``n`` and ``n_ctx``.

Why a process of its own: on the GPU machine, llama-cpp-python loaded in a process that has initialised torch's CUDA
libraries crashed it (segmentation fault in ``test_greedy_on_cuda_equals_llama_cpp``, signal 6 in the benchmark's
peer, 2026-12-07). On the CPU the reference tests keep llama.cpp in-process (``test_gpt_oss_reference``); this runs
the same functions (``open_llama``, ``greedy_tokens``)."""

from __future__ import annotations

import json
import sys


def open_llama(path: str, n_ctx: int):
    """The reference tests' llama.cpp: F32 KV cache (llama.cpp's default F16 cache adds its own rounding and, without
    flash attention, disagrees with itself by up to 0.8 on GPT-OSS's logits when the sinks differ between heads),
    every position's logits, two threads."""
    import llama_cpp

    return llama_cpp.Llama(str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_threads=2, seed=0, type_k=0,
                           type_v=0, verbose=True)  # verbose=False may crash llama-cpp-python


def greedy_tokens(llm, prompt: list[int], n: int) -> list[int]:
    """``n`` tokens, each the argmax of the last position's logits, fed back one at a time."""
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def greedy(path: str, prompt: list[int], n: int, n_ctx: int) -> list[int]:
    llm = open_llama(path, n_ctx)
    try:
        return greedy_tokens(llm, prompt, n)
    finally:
        llm.close()


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        request = json.load(f)
    print(json.dumps(greedy(**request)), flush=True)
