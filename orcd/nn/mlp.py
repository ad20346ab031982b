"""The SwiGLU feed-forward block: ``down(silu(gate(x)) * up(x))``, with gate and up as two projections or one
fused projection whose first half of output rows is the gate (Phi-3's ``ffn_up``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orcd.quant import QuantizedLinear


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
        return self.down(F.silu(g) * u)
