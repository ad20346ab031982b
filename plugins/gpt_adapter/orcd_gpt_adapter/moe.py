"""GPT-OSS's mixture-of-experts feed-forward: a router with a bias picks the top-k experts of each token, a softmax
over the k selected logits weighs them, and each expert is a clamped SwiGLU with biases.

Expert weights stay in their ggml encoding (MXFP4 in real files) as one 3-D ``QuantizedTensor``
``(n_expert, rows, cols)`` per projection. Only the experts some token chose are decoded. A prefill groups the
(token, slot) pairs by expert and runs each chosen expert once over its tokens, through ``QuantizedLinear`` on a view
of the expert's rows (so a format's fused kernel, ``QuantFormat.linear``, serves experts too). A decode step has
fewer pairs than experts: it gathers the chosen experts' blocks, decodes them in one call and multiplies in one
batched matmul, with no per-expert Python loop and no host sync.

Where the weights' format has a fused expert kernel (``QuantFormat.expert_linear``: on CUDA, the Triton kernels of
``orcd_quant_formats``), every batch size goes through it instead: pairs are grouped by expert on the device, each
chosen expert's blocks are read once per group and decoded in registers, and there is no host sync, so decode steps
of any batch size can be captured in a CUDA graph. The two paths above stay as the fallback and the oracle.

On CUDA the gate and up tensors of the experts are stacked at load (``stack_gate_up``): expert ``e`` holds its gate
rows then its up rows, so one expert launch computes both (as ``orcd.nn.fusion`` stacks a dense SwiGLU's gate|up),
and the clamped SwiGLU reads the two halves of its output in place.

Where the core's kernels apply (``orcd.nn.triton_support.use_kernels``: CUDA, Triton, ``ORCD_KERNELS`` not ``0``),
the router of a decode batch (logits, then top-k and softmax) is two Triton kernels, the clamped SwiGLU and the
weighted sum of the k expert outputs one each (``orcd_gpt_adapter.moe_kernels``), instead of ~14 small torch
kernels; the torch code is the fallback and the oracle. The router kernel breaks ties between equal logits towards the lower expert
index, where ``torch.topk`` promises no order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F

from orcd.errors import ModelFileError
from orcd.nn.triton_support import use_kernels
from orcd.quant import QuantizedLinear, QuantizedTensor

SWIGLU_ALPHA = 1.702  # llama.cpp's swiglu_oai and HF's swiglu_alpha
SWIGLU_LIMIT = 7.0  # llama.cpp's swiglu_oai and HF's swiglu_limit


@functools.cache
def _kernels() -> ModuleType:
    # imports Triton: only once a kernel is due to run
    from orcd_gpt_adapter import moe_kernels

    return moe_kernels


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float = SWIGLU_ALPHA,
                   limit: float = SWIGLU_LIMIT) -> torch.Tensor:
    """GPT-OSS's SwiGLU: the gate clamped from above, the up projection on both sides, and ``up + 1``."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1.0)


# Below this many dequantized values (256 MiB of float32) the chosen experts of a small batch are decoded in one
# gather and multiplied in one batched matmul: no per-expert loop and no host sync, which is what decode needs.
GATHER_MAX_ELEMENTS = 64 * 1024 * 1024


class ExpertProjection(torch.nn.Module):
    """One projection of every expert: a 3-D ``QuantizedTensor`` ``(n_expert, rows, cols)`` and its ``(n_expert,
    rows)`` bias. ``experts[e]`` is expert ``e`` as a ``QuantizedLinear`` over a view of its rows (no copy); the
    views sit in a plain list, so walking the module's tensors (``orcd.device.iter_tensors``) counts each byte
    once."""

    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        if len(weight.shape) != 3:
            raise ModelFileError(f"tensor {weight.name!r}: expert weights must be 3-D (experts, rows, columns), "
                                 f"got shape {weight.shape}", tensor=weight.name)
        self.n_expert, self.rows, self.cols = weight.shape
        if bias is not None and tuple(bias.shape) != (self.n_expert, self.rows):
            raise ModelFileError(f"tensor {weight.name!r}: its bias has shape {tuple(bias.shape)}, expected "
                                 f"{(self.n_expert, self.rows)}", tensor=weight.name)
        self.weight, self.bias = weight, bias
        rows = self.rows
        self.experts = [
            QuantizedLinear(QuantizedTensor(f"{weight.name}[{e}]", weight.data[e * rows:(e + 1) * rows], weight.fmt,
                                            (rows, self.cols)), None if bias is None else bias[e])
            for e in range(self.n_expert)
        ]

    def extra_repr(self) -> str:
        return f"{self.n_expert} x ({self.cols} -> {self.rows}), {self.weight.fmt.name}, bias={self.bias is not None}"

    def fused(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
        """The format's fused expert kernel: ``ids (T, k)`` sends token ``t`` of ``x (T, cols)`` through its ``k``
        experts, ``ids (P,)`` row ``p`` through ``ids[p]``; ``(P, rows)`` in pair order, or ``None`` where the format
        has no kernel for this input (then use ``gathered`` or the experts' own linears)."""
        return self.weight.fmt.expert_linear(x, self.weight, ids, self.bias)

    def gathered(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Row ``p`` of ``x (P, cols)`` through expert ``ids[p]``: ``(P, rows)``, decoding only those experts."""
        fmt = self.weight.fmt
        blocks = self.weight.data.view(self.n_expert, self.rows, -1).index_select(0, ids)
        w = fmt.dequantize(blocks.reshape(-1, fmt.type_size)).view(ids.numel(), self.rows, self.cols).to(x.dtype)
        y = torch.bmm(w, x.unsqueeze(-1)).squeeze(-1)
        return y if self.bias is None else y + self.bias.index_select(0, ids).to(y.dtype)


def stack_gate_up(name: str, gate: ExpertProjection, up: ExpertProjection) -> ExpertProjection | None:
    """One projection whose expert ``e`` is ``gate``'s expert ``e`` rows, then ``up``'s: ``(n_expert, 2 * rows,
    cols)``. ``None`` where they cannot share one weight (formats, shapes or devices differ). The blocks are copied;
    the originals are freed once unreferenced. A missing bias beside a present one contributes zeros."""
    g, u = gate.weight, up.weight
    if (g.fmt.ggml_type != u.fmt.ggml_type or g.shape != u.shape or g.data.device != u.data.device
            or g.data.dim() != 2 or u.data.dim() != 2):
        return None
    n_expert, rows, cols = g.shape
    data = torch.cat([g.data.view(n_expert, rows, -1), u.data.view(n_expert, rows, -1)], dim=1)
    bias = None
    if gate.bias is not None or up.bias is not None:
        ref = gate.bias if gate.bias is not None else up.bias
        bias = torch.cat([b if b is not None else torch.zeros_like(ref) for b in (gate.bias, up.bias)], dim=1)
    return ExpertProjection(QuantizedTensor(name, data.view(n_expert * 2 * rows, -1), g.fmt,
                                            (n_expert, 2 * rows, cols)), bias)


class MixtureOfExperts(torch.nn.Module):
    """``x (..., hidden)`` → the weighted sum of the ``top_k`` chosen experts' outputs, ``(..., hidden)``. ``gate``
    ``None`` means ``up`` is the stacked ``[gate | up]`` projection (``stack_gate_up``)."""

    def __init__(
        self,
        router_weight: torch.Tensor,
        router_bias: torch.Tensor | None,
        gate: ExpertProjection | None,
        up: ExpertProjection,
        down: ExpertProjection,
        top_k: int,
        alpha: float = SWIGLU_ALPHA,
        limit: float = SWIGLU_LIMIT,
    ) -> None:
        super().__init__()
        n_expert = router_weight.shape[0]
        projections = [p for p in (gate, up, down) if p is not None]
        if any(p.n_expert != n_expert for p in projections):
            raise ValueError(f"the router scores {n_expert} experts but the gate, up and down tensors hold "
                             f"{', '.join(str(p.n_expert) for p in projections)}")
        if gate is None and up.rows != 2 * down.cols:
            raise ValueError(f"a stacked gate|up projection has {up.rows} rows; the down projection reads "
                             f"{down.cols}, half of what it needs")
        if not 0 < top_k <= n_expert:
            raise ValueError(f"cannot use {top_k} of {n_expert} experts per token")
        self.router_weight = torch.nn.Parameter(router_weight.float(), requires_grad=False)
        self.router_bias = None if router_bias is None else torch.nn.Parameter(router_bias.float(),
                                                                               requires_grad=False)
        self.gate, self.up, self.down = gate, up, down
        self.n_expert, self.top_k = n_expert, top_k
        self.alpha, self.limit = alpha, limit
        self.gather_max_pairs = GATHER_MAX_ELEMENTS // max(p.rows * p.cols for p in projections)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen experts ``(N, top_k)`` and their weights ``(N, top_k)`` for tokens ``x (N, hidden)``. The ids are
        int32 from the router kernel, int64 from torch's ``topk``."""
        if use_kernels(x, self.router_weight) and _kernels().route_fits(x.shape[0], self.n_expert, self.top_k):
            return _kernels().route(x, self.router_weight, self.router_bias, self.top_k)
        logits = F.linear(x.float(), self.router_weight, self.router_bias)
        top_logits, chosen = logits.topk(self.top_k, dim=-1)
        return chosen, torch.softmax(top_logits, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        chosen, weights = self.route(x)
        flat = chosen.reshape(-1)  # pair p is token p // top_k through expert flat[p]
        outputs = self._pairs_fused(x, chosen)
        if outputs is None and flat.numel() <= min(self.n_expert, self.gather_max_pairs):
            outputs = self._pairs_gathered(x, flat)
        elif outputs is None:
            outputs = self._pairs_grouped(x, flat)
        return self._weighted_sum(outputs, weights, x.dtype).reshape(shape)

    def _weighted_sum(self, outputs: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The k rows of a token weighed and summed in slot order: no scatter-add, so the result is deterministic on
        every device. ``outputs (T*k, hidden)`` fp32, ``weights (T, k)`` → ``(T, hidden)`` in ``dtype``."""
        if use_kernels(outputs, weights):
            return _kernels().weighted_sum(outputs, weights, dtype)
        out = (outputs.view(-1, self.top_k, outputs.shape[-1]) * weights.unsqueeze(-1)).sum(dim=1)
        return out.to(dtype)

    def _expert_mlp(self, gate: torch.Tensor, up: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The clamped SwiGLU in fp32, stored in ``dtype`` (the down projection's input dtype)."""
        if gate.shape == up.shape and use_kernels(gate, up):
            return _kernels().clamped_swiglu(gate, up, self.alpha, self.limit, dtype)
        return clamped_swiglu(gate.float(), up.float(), self.alpha, self.limit).to(dtype)

    def _halves(self, stacked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate and up, views of a stacked projection's output."""
        ffn = stacked.shape[-1] // 2
        return stacked[..., :ffn], stacked[..., ffn:]

    def _gate_up(self, project: Callable[[ExpertProjection], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate and up outputs, ``project`` run on the stacked projection once or on each."""
        if self.gate is None:
            return self._halves(project(self.up))
        return project(self.gate), project(self.up)

    def _pairs_fused(self, x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor | None:
        """Every pair through the formats' fused expert kernels; ``None`` if the gate's format has none here. A
        later projection without one (a mixed-format file) takes the gathered reference for its pairs."""
        chosen = chosen.to(torch.int32)  # the kernels' index type (the router kernel's already): none per projection
        if self.gate is None:
            stacked = self.up.fused(x, chosen)
            if stacked is None:
                return None
            gate, up = self._halves(stacked)
        else:
            gate = self.gate.fused(x, chosen)
            if gate is None:
                return None
            up = self.up.fused(x, chosen)
            if up is None:
                up = self.up.gathered(x.repeat_interleave(self.top_k, dim=0), chosen.reshape(-1))
        h = self._expert_mlp(gate, up, x.dtype)
        flat = chosen.reshape(-1)
        down = self.down.fused(h, flat)
        return (down if down is not None else self.down.gathered(h, flat)).float()

    def _pairs_gathered(self, x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """Few pairs (decode): every pair's expert decoded at once, one batched matmul per projection."""
        xp = x.repeat_interleave(self.top_k, dim=0)
        h = self._expert_mlp(*self._gate_up(lambda p: p.gathered(xp, flat)), x.dtype)
        return self.down.gathered(h, flat).float()

    def _pairs_grouped(self, x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """Many pairs (prefill): sorted by expert, each expert decoded once and run over all its tokens."""
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.n_expert).tolist()  # the one host sync of this path
        outputs = x.new_empty(flat.numel(), x.shape[-1], dtype=torch.float32)
        start = 0
        for e, count in enumerate(counts):
            if not count:
                continue
            pairs = order[start:start + count]
            start += count
            xe = x.index_select(0, pairs // self.top_k)
            h = self._expert_mlp(*self._gate_up(lambda p: p.experts[e](xe)), x.dtype)
            outputs.index_copy_(0, pairs, self.down.experts[e](h).float())
        return outputs

    def extra_repr(self) -> str:
        g = self.up if self.gate is None else self.gate
        return (f"experts={self.n_expert}, top_k={self.top_k}, {g.weight.fmt.name} {g.cols} -> {self.down.cols}"
                + (" (gate|up stacked)" if self.gate is None else ""))
