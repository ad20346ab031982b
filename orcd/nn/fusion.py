"""Projections that read the same input, stacked into one weight at load time: Q, K and V of an attention layer
(as Phi-3's files already store them), and the gate and up projections of a SwiGLU (as Phi-3's ``ffn_up``). A decode
step then launches one fused dequantize-matmul where it launched three or two; each output row is still its own
dot product, so the results are those of the separate projections.

Stacking needs one format for all parts (a Q4_K_M file may store V as Q6_K while Q and K are Q4_K: those stay
separate) and is done only on CUDA, where launches are what a decode step waits for (and on the CPU where the
kernel tests run the CUDA path in Triton's interpreter); elsewhere on the CPU the tensors stay as the file has them.
"""

from __future__ import annotations

import torch

from orcd.nn.attention import FusedQKV, SeparateQKV
from orcd.nn.mlp import SwiGLU
from orcd.nn.triton_support import interpreted
from orcd.quant import QuantizedLinear, stack_linears


def stacks_on(device: torch.device | str) -> bool:
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and interpreted())


def qkv_projection(prefix: str, q: QuantizedLinear, k: QuantizedLinear, v: QuantizedLinear,
                   device: torch.device | str) -> SeparateQKV | FusedQKV:
    """``FusedQKV`` over the stacked rows where they share a format (on CUDA), else ``SeparateQKV``."""
    stacked = stack_linears(f"{prefix}attn_qkv(stacked)", [q, k, v]) if stacks_on(device) else None
    if stacked is None or k.out_features != v.out_features:
        return SeparateQKV(q, k, v)
    return FusedQKV(stacked, q.out_features, k.out_features)


def swiglu(prefix: str, gate: QuantizedLinear, up: QuantizedLinear, down: QuantizedLinear,
           device: torch.device | str) -> SwiGLU:
    """``SwiGLU`` with gate and up stacked into one ``[gate | up]`` projection where they share a format (on CUDA)."""
    stacked = None
    if stacks_on(device) and gate.out_features == up.out_features:
        stacked = stack_linears(f"{prefix}ffn_gate_up(stacked)", [gate, up])
    return SwiGLU(None, stacked, down) if stacked is not None else SwiGLU(gate, up, down)
