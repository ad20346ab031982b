"""llama.cpp's greedy continuation, in a process without torch: ``python tests/llama_greedy.py REQUEST.json`` prints
the token ids as one JSON line. ``REQUEST`` holds ``path``, ``prompt`` (token ids), ``n`` and ``n_ctx``.

Why a process of its own: on the GPU machine, llama-cpp-python loaded in a process that has initialised torch's CUDA
libraries crashed it (segmentation fault in ``test_greedy_on_cuda_equals_llama_cpp``, signal 6 in the benchmark's
peer, 2026-12-07). On the CPU the reference tests keep llama.cpp in-process (``test_gpt_oss_reference``); this runs
the same settings: F32 KV cache, two threads, greedy by the argmax of the last position's logits."""

from __future__ import annotations

import json
import sys


def greedy(path: str, prompt: list[int], n: int, n_ctx: int) -> list[int]:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(path, logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_threads=2, seed=0, type_k=0,
                          type_v=0, verbose=True)  # verbose=False may crash llama-cpp-python
    llm.eval(prompt)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    llm.close()
    return out


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        request = json.load(f)
    print(json.dumps(greedy(**request)), flush=True)
