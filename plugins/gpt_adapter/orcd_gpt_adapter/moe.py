"""GPT-OSS's mixture-of-experts feed-forward: a router with a bias picks the top-k experts of each token, a softmax
over the k selected logits weighs them, and each expert is a clamped SwiGLU with biases.

Expert weights stay in their ggml encoding (MXFP4 in real files) as one 3-D ``QuantizedTensor``
``(n_expert, rows, cols)``; each expert is a 2-D view of its rows, multiplied through ``QuantizedLinear`` so a
format's fused kernel (``QuantFormat.linear``) serves experts too. Only the experts some token selected run, each
once over the tokens that chose it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orcd.errors import ModelFileError
from orcd.quant import QuantizedLinear, QuantizedTensor

SWIGLU_ALPHA = 1.702  # llama.cpp's swiglu_oai and HF's swiglu_alpha
SWIGLU_LIMIT = 7.0  # llama.cpp's swiglu_oai and HF's swiglu_limit


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float = SWIGLU_ALPHA,
                   limit: float = SWIGLU_LIMIT) -> torch.Tensor:
    """GPT-OSS's SwiGLU: the gate clamped from above, the up projection on both sides, and ``up + 1``."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1.0)


def expert_views(weight: QuantizedTensor, bias: torch.Tensor | None) -> list[QuantizedLinear]:
    """One ``QuantizedLinear`` per expert over the rows of a 3-D ``(n_expert, rows, cols)`` tensor (no copies)."""
    if len(weight.shape) != 3:
        raise ModelFileError(f"tensor {weight.name!r}: expert weights must be 3-D (experts, rows, columns), "
                             f"got shape {weight.shape}", tensor=weight.name)
    n_expert, rows, cols = weight.shape
    if bias is not None and tuple(bias.shape) != (n_expert, rows):
        raise ModelFileError(f"tensor {weight.name!r}: its bias has shape {tuple(bias.shape)}, expected "
                             f"{(n_expert, rows)}", tensor=weight.name)
    experts = []
    for e in range(n_expert):
        view = QuantizedTensor(f"{weight.name}[{e}]", weight.data[e * rows:(e + 1) * rows], weight.fmt, (rows, cols))
        experts.append(QuantizedLinear(view, None if bias is None else bias[e]))
    return experts


class MixtureOfExperts(torch.nn.Module):
    """``x (..., hidden)`` → the weighted sum of the ``top_k`` chosen experts' outputs, ``(..., hidden)``."""

    def __init__(
        self,
        router_weight: torch.Tensor,
        router_bias: torch.Tensor | None,
        gate: list[QuantizedLinear],
        up: list[QuantizedLinear],
        down: list[QuantizedLinear],
        top_k: int,
        alpha: float = SWIGLU_ALPHA,
        limit: float = SWIGLU_LIMIT,
    ) -> None:
        super().__init__()
        n_expert = router_weight.shape[0]
        if not (len(gate) == len(up) == len(down) == n_expert):
            raise ValueError(f"the router scores {n_expert} experts but there are {len(gate)} gate, {len(up)} up "
                             f"and {len(down)} down projections")
        if not 0 < top_k <= n_expert:
            raise ValueError(f"cannot use {top_k} of {n_expert} experts per token")
        self.router_weight = torch.nn.Parameter(router_weight.float(), requires_grad=False)
        self.router_bias = None if router_bias is None else torch.nn.Parameter(router_bias.float(),
                                                                               requires_grad=False)
        # Plain lists: the experts are views of three shared tensors, not separately owned parameters.
        self.gate, self.up, self.down = gate, up, down
        self.n_expert, self.top_k = n_expert, top_k
        self.alpha, self.limit = alpha, limit

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen experts ``(N, top_k)`` and their weights ``(N, top_k)`` for tokens ``x (N, hidden)``."""
        logits = F.linear(x.float(), self.router_weight, self.router_bias)
        top_logits, chosen = logits.topk(self.top_k, dim=-1)
        return chosen, torch.softmax(top_logits, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        chosen, weights = self.route(x)
        # Group the (token, slot) pairs by expert: one sort, then one contiguous run per expert.
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.n_expert).tolist()  # the one host sync per layer
        # Each pair's expert output lands in its own row, then the k rows of a token are weighed and summed in slot
        # order: no scatter-add, so the sum is deterministic on every device (and CPU index_add_ is slow).
        outputs = x.new_empty(flat.numel(), shape[-1], dtype=torch.float32)
        start = 0
        for e, count in enumerate(counts):
            if not count:
                continue
            pairs = order[start:start + count]
            start += count
            xe = x.index_select(0, pairs // self.top_k)
            h = clamped_swiglu(self.gate[e](xe).float(), self.up[e](xe).float(), self.alpha, self.limit)
            outputs.index_copy_(0, pairs, self.down[e](h.to(x.dtype)).float())
        out = (outputs.view(-1, self.top_k, shape[-1]) * weights.unsqueeze(-1)).sum(dim=1)
        return out.to(x.dtype).reshape(shape)

    def extra_repr(self) -> str:
        w = self.gate[0].weight
        return f"experts={self.n_expert}, top_k={self.top_k}, {w.fmt.name} {w.shape[1]} -> {w.shape[0]}"
