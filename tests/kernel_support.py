"""What the kernel tests share: Triton's interpreter switched on where there is no GPU (it must be set before the
first import of a kernel module, so the test modules import this first) and the markers that place each test.

- ``interpreter_only``: CPU machines with Triton (the kernels run on CPU tensors in the interpreter; the tests set
  ``ORCD_INTERPRET_KERNELS=1`` so the modules take them there);
- ``gpu_test``: compiled kernels on CUDA (``gpu``-marked, skipped without Triton, a GPU, or under the interpreter);
- ``needs_triton``: anything else that needs Triton. CI installs no Triton: these tests skip there.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON and not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of the kernel modules
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (the kernels' development tests)")
interpreter_only = pytest.mark.skipif(
    not (HAS_TRITON and INTERPRETED), reason="interpreter tests: CPU machines, or TRITON_INTERPRET=1")


def gpu_test(fn):
    """Compiled kernels on CUDA: ``gpu``-marked, and skipped without Triton or a GPU, or under the interpreter."""
    for mark in (pytest.mark.gpu, needs_triton, pytest.mark.skipif(INTERPRETED, reason="TRITON_INTERPRET=1 is set"),
                 pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")):
        fn = mark(fn)
    return fn


def greedy_tokens(loaded, plugins, lengths: tuple[int, ...], max_tokens: int, **engine_options) -> list[int]:
    """Every token an engine produces for greedy requests with prompts of ``lengths`` tokens, in event order: the
    end-to-end check that a kernel switched on (``ORCD_KERNELS``) leaves a model's output as it was."""
    from orcd.engine import Engine, GenerationRequest, TokenEvent
    from orcd.sampling import SamplingParams

    engine = Engine(loaded, plugins, n_ctx=96, **engine_options)
    for i, n in enumerate(lengths):
        prompt = [(7 * i + j) % 50 + 10 for j in range(n)]
        engine.add_request(GenerationRequest(request_id=str(i), prompt_ids=prompt, max_tokens=max_tokens,
                                             sampling=SamplingParams(temperature=0.0), stop_token_ids=set()))
    tokens: list[int] = []
    while engine.has_work():
        tokens += [e.token_id for e in engine.step() if isinstance(e, TokenEvent)]
    return tokens
