"""What the kernel tests share: Triton's interpreter switched on where there is no GPU (it must be set before the
first import of a kernel module, so the test modules import this first) and the markers that place each test.

- ``interpreter_only``: CPU machines with Triton (the kernels run on CPU tensors in the interpreter; the tests set
  ``ORCD_INTERPRET_KERNELS=1`` so the modules take them there);
- ``gpu_test``: compiled kernels on CUDA (``gpu``-marked, skipped without Triton, a GPU, or under the interpreter);
- ``needs_triton``: anything else that needs Triton (the test extra installs it; without it these tests skip);
- ``KERNEL_PATHS`` / ``take_path``: the model-level reference tests' runs on the kernels: in the interpreter (CPU)
  and compiled on CUDA (GPU).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

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


# The model-level reference tests run on the reference path (CPU), and again on the CUDA fast path's kernels (fused
# quantized matmuls and experts, stacked projections, norms, rotary): where Triton is installed and no GPU is, on CPU
# tensors in Triton's interpreter; on a GPU, compiled, with the model on CUDA ("cuda", ``gpu``-marked: outside CI).
on_cuda_only = [pytest.mark.gpu, pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON) or INTERPRETED,
                                                    reason="needs a CUDA device and Triton (compiled kernels)")]
KERNEL_PATHS = ["reference", pytest.param("interpreted-kernels", marks=interpreter_only),
                pytest.param("cuda", marks=on_cuda_only)]
FAST_PATHS = ("interpreted-kernels", "cuda")


def path_device(path: str) -> str:
    """Where a reference test's model runs on ``path``."""
    return "cuda" if path == "cuda" else "cpu"


@dataclass
class KernelCalls:
    """How many projections the quant plugin's fused kernels computed (``QuantFormat.linear`` and ``expert_linear``
    calls that did not fall back to the reference path)."""

    linear: int = 0
    experts: int = 0

    def took(self, path: str) -> bool:
        """The calls agree with ``path``: some kernels on a fast path, none on the reference path."""
        used = self.linear > 0 or self.experts > 0
        return used == (path in FAST_PATHS)


def take_path(monkeypatch: pytest.MonkeyPatch, path: str) -> KernelCalls:
    """Switch the CPU model code onto ``path`` (one of ``KERNEL_PATHS``) and count the fused projections from here
    on; call it before the model is built, since projections are stacked for the kernels at build time."""
    import orcd_quant_formats.kernels as quant_kernels

    monkeypatch.setenv("ORCD_INTERPRET_KERNELS", "1" if path == "interpreted-kernels" else "0")
    calls = KernelCalls()
    for name, field in (("fused_linear", "linear"), ("expert_linear", "experts")):
        def counted(*args, _real=getattr(quant_kernels, name), _field=field, **kwargs):
            out = _real(*args, **kwargs)
            if out is not None:
                setattr(calls, _field, getattr(calls, _field) + 1)
            return out

        monkeypatch.setattr(quant_kernels, name, counted)
    return calls


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
