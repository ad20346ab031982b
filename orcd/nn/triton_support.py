"""When the core's own Triton kernels (fused norms, rotary, decode attention) may run.

They are optional: the core needs only torch, and every fused op has a torch path that is the oracle and the CPU
fallback. A kernel runs when its input is on a CUDA device, Triton imports, and ``ORCD_KERNELS`` is not ``0`` (the
switch the quant plugin's kernels honour too). Tests on CPU machines run the kernels in Triton's interpreter
(``TRITON_INTERPRET=1`` and ``ORCD_INTERPRET_KERNELS=1`` with CPU tensors): ``interpreted()`` says so.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


def kernels_enabled() -> bool:
    """False when ``ORCD_KERNELS=0`` (read at every call, so tests and benchmarks can flip it)."""
    return os.environ.get("ORCD_KERNELS", "1").strip() != "0"


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """The kernels' development tests asked for them on CPU tensors: Triton's interpreter is on
    (``TRITON_INTERPRET=1``) and ``ORCD_INTERPRET_KERNELS=1``. The second switch is set per test by the kernel
    tests only, so the other CPU tests of the same run keep the (much faster) torch path."""
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("ORCD_INTERPRET_KERNELS") == "1"


def use_kernels(*tensors: torch.Tensor) -> bool:
    """The core's Triton kernels apply to ``tensors``: all on one CUDA device (or on the CPU under the
    interpreter), Triton importable, kernels not switched off."""
    if not (kernels_enabled() and triton_importable() and tensors):
        return False
    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        return False
    return dev.type == "cuda" or (dev.type == "cpu" and interpreted())
