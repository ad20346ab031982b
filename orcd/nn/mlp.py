"""The SwiGLU feed-forward block: ``down(silu(gate(x)) * up(x))``, with gate and up as two projections or one
fused projection whose first half of output rows is the gate (Phi-3's ``ffn_up``).

Where the core's kernels apply (``orcd.nn.triton_support.use_kernels``) the activation ``silu(g) * u`` is one
Triton kernel (``orcd.nn.norm_kernels.swiglu``, fp32 math) reading the fused projection's halves in place; the
torch expression is the fallback and the oracle."""

from __future__ import annotations

import functools
from types import ModuleType

import torch
import torch.nn.functional as F

from orcd.nn.triton_support import use_kernels
from orcd.quant import QuantizedLinear


@functools.cache
def _kernels() -> ModuleType:
    from orcd.nn import norm_kernels  # imports Triton: only once a kernel is due to run

    return norm_kernels


def swiglu_activation(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u``: one fused kernel where the kernels apply (same shapes), else the torch expression."""
    if g.shape == u.shape and use_kernels(g, u):
        return _kernels().swiglu(g, u)
    return F.silu(g) * u


class SwiGLU(torch.nn.Module):
    def __init__(self, gate: QuantizedLinear | None, up: QuantizedLinear, down: QuantizedLinear) -> None:
        """``gate=None`` means ``up`` is fused: its output is ``[gate | up]``."""
        super().__init__()
        if gate is None and up.out_features % 2:
            raise ValueError(f"tensor {up.weight.name!r}: a fused gate|up projection needs an even row count, "
                             f"got {up.out_features}")
        self.gate, self.up, self.down = gate, up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            g, u = self.up(x).chunk(2, dim=-1)
        else:
            g, u = self.gate(x), self.up(x)
        return self.down(swiglu_activation(g, u))
