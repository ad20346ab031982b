"""Fused dequantize-matmul kernels (Triton) behind ``QuantFormat.linear``, and the mixture-of-experts projection.

They run only where they can: ``x`` on a CUDA device (or on the CPU in Triton's interpreter, where the kernel tests
ask for it: ``orcd.nn.triton_support.interpreted``), Triton importable, a format with a tile function
(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, MXFP4), fp16/bf16/fp32 ``x``. A linear with many rows of ``x`` (a
prompt: ``dequant.MIN_ROWS`` or more) decodes its weights into a bounded scratch tile and multiplies with torch's GEMM
(``dequant``); fewer rows run the fused kernels of ``matmul``. Everywhere else the functions here
return ``None`` and the caller keeps the reference path (dequantize, then matmul), which also stays the oracle:
``ORCD_KERNELS=0`` switches the kernels off. Nothing here imports Triton until a CUDA tensor asks for it, so the
plugin imports and works without Triton or a GPU.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

from orcd.nn.triton_support import interpreted
from orcd.quant import QuantizedTensor

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kernels_enabled() -> bool:
    """False when ``ORCD_KERNELS=0`` (read at every call, so tests and benchmarks can flip it)."""
    return os.environ.get("ORCD_KERNELS", "1").strip() != "0"


@functools.cache
def _matmul() -> ModuleType | None:
    try:
        from orcd_quant_formats.kernels import matmul
    except ImportError:  # no Triton: the reference path serves
        return None
    return matmul


@functools.cache
def _dequant() -> ModuleType:
    from orcd_quant_formats.kernels import dequant  # Triton is importable once _matmul() was

    return dequant


def _usable(x: torch.Tensor, weight: QuantizedTensor) -> ModuleType | None:
    on_device = x.is_cuda or (x.device.type == "cpu" and interpreted())
    if not (on_device and kernels_enabled() and x.dtype in DTYPES and weight.device == x.device):
        return None
    mod = _matmul()
    if mod is None or int(weight.fmt.ggml_type) not in mod.SPECS:
        return None
    data, spec = weight.data, mod.SPECS[int(weight.fmt.ggml_type)]
    if weight.shape[-1] % spec.block_size or data.stride(-1) != 1:
        return None
    if spec.type_size % 2 == 0 and data.data_ptr() % 2:  # fields are read as uint16 (blocks of even size)
        return None
    return mod


def fused_linear(x: torch.Tensor, weight: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``x @ W.T + bias`` through the fused kernel, or ``None`` where it does not apply (``QuantFormat.linear``)."""
    mod = _usable(x, weight)
    if mod is None or len(weight.shape) != 2:
        return None
    n, k = weight.shape
    x2 = mod.as_rows(x, k)
    dequant = _dequant()
    if x2.shape[0] >= dequant.MIN_ROWS:
        out = dequant.linear(x2, weight.data, int(weight.fmt.ggml_type), n, k, bias)
        return out.reshape(*x.shape[:-1], n)
    return mod.linear(x, weight.data, int(weight.fmt.ggml_type), n, k, bias)


def expert_linear(
    x: torch.Tensor, weight: QuantizedTensor, ids: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Chosen experts only, grouped by expert: ``weight`` is 3-D ``(n_expert, rows, cols)``, ``bias``
    ``(n_expert, rows)``. ``ids (P,)`` sends row ``p`` of ``x (P, cols)`` through expert ``ids[p]``; ``ids (T, k)``
    sends token ``t`` of ``x (T, cols)`` through each of its ``k`` experts. Returns ``(P, rows)`` (pair ``p`` in
    ``ids.reshape(-1)`` order), or ``None`` where the kernels do not apply (then use the reference path). No host
    sync, so it can be captured in a CUDA graph. Expert ids must lie in ``0 .. n_expert - 1`` (not checked: that
    would need a sync)."""
    mod = _usable(x, weight)
    if mod is None or len(weight.shape) != 3:
        return None
    n_expert, rows, cols = weight.shape
    return mod.expert_linear(x, weight.data, int(weight.fmt.ggml_type), n_expert, rows, cols, ids, bias)


class FusedLinear:
    """Mixin for a ``QuantFormat``: ``linear`` (and ``expert_linear``, for a 3-D weight of experts) through the fused
    kernels, ``None`` (reference path) where they do not apply."""

    def linear(self, x: torch.Tensor, weight: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        return fused_linear(x, weight, bias)

    def expert_linear(
        self, x: torch.Tensor, weight: QuantizedTensor, ids: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        return expert_linear(x, weight, ids, bias)


__all__ = ["FusedLinear", "expert_linear", "fused_linear", "kernels_enabled"]
