"""RMSNorm as llama.cpp and HF compute it: normalise in float32, then scale by the weight.

Where the core's kernels apply (``orcd.nn.triton_support.use_kernels``: CUDA, Triton, ``ORCD_KERNELS`` not ``0``)
a call is one fused Triton kernel (``orcd.nn.norm_kernels``) instead of ~6 elementwise/reduction kernels, and
``add_and_norm`` also takes in the residual add before it. The torch code below is the fallback and the oracle.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from orcd.nn.triton_support import use_kernels


@functools.cache
def _kernels() -> ModuleType:
    from orcd.nn import norm_kernels  # imports Triton: only once a kernel is due to run

    return norm_kernels


class RMSNorm(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight.float(), requires_grad=False)
        self.eps = eps

    def _fused(self, *tensors: torch.Tensor) -> bool:
        """The fused kernel serves: kernels apply, and the rows match the weight and fit one program."""
        width = tensors[0].shape[-1]
        return (use_kernels(*tensors, self.weight) and width == self.weight.shape[0]
                and _kernels().norm_fits(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused(x):
            return _kernels().rms_norm(x, self.weight, self.eps)
        return self._torch_norm(x)

    def _torch_norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight).to(x.dtype)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, self(h))`` with ``h = x + delta``: the residual add and the next norm, one kernel where the kernels
        apply (same shapes only; broadcasting takes the torch path)."""
        if x.shape == delta.shape and self._fused(x, delta):
            return _kernels().add_rms_norm(x, delta, self.weight, self.eps)
        h = x + delta
        return h, self(h)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
