"""Rotary position embedding, NEOX style (the two halves of the rotated dimensions form the pairs), as llama.cpp
uses for Qwen2, Phi-3 and GPT-OSS.

Every variant this module knows reduces to one inverse frequency per rotated pair plus one magnitude factor
(``mscale``) on cos and sin, because each keeps the angle linear in the position:

- plain: ``inv_freq[i] = base ** (-2i / dim)``;
- per-pair frequency factors (Phi-3 "longrope" ``rope_factors_long/short``, Llama-3 ``rope_freqs``): divided in;
- linear scaling: ``inv_freq * freq_scale``;
- YaRN: each pair blends the interpolated and the original frequency by a ramp over the pair index, and the
  magnitude grows by ``1 + 0.1 ln(1 / freq_scale)`` (ggml's ``rope_yarn``), times the model's attention factor.

So the frequencies are computed once, in float64, and cos/sin of ``position * inv_freq`` per call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from orcd.nn.triton_support import use_kernels

# Activation dtypes the fused rotary kernel takes (its math is fp32 whatever the input).
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class RopeScaling:
    """How the frequencies are stretched for a longer context. ``kind`` is ``none``, ``linear`` or ``yarn``;
    ``factor`` is the context extension (ggml's ``freq_scale = 1 / factor``); ``attn_factor`` multiplies cos and
    sin (Phi-3 longrope's ``sqrt(1 + ln(s) / ln(n_orig))``, YaRN's model-given factor)."""

    kind: str = "none"
    factor: float = 1.0
    original_context_length: int = 0
    attn_factor: float = 1.0
    beta_fast: float = 32.0  # YaRN: pairs rotating faster than this many turns over n_orig keep their frequency
    beta_slow: float = 1.0  # YaRN: pairs slower than this are fully interpolated
    ext_factor: float = 1.0  # YaRN: strength of the ramp (ggml's ext_factor; 0 disables the blend)

    def __post_init__(self) -> None:
        if self.kind not in ("none", "linear", "yarn"):
            raise ValueError(f"unknown rope scaling {self.kind!r} (none, linear, yarn)")
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be positive, got {self.factor}")
        if self.kind == "yarn" and self.original_context_length <= 0:
            raise ValueError("YaRN needs the original (training) context length")


def _yarn_corr_dim(dim: int, n_orig: int, n_rot: float, base: float) -> float:
    """The pair index whose wavelength turns ``n_rot`` times over ``n_orig`` positions (ggml's corr_dim)."""
    return dim * math.log(n_orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))


def rope_frequencies(
    dim: int, base: float, scaling: RopeScaling | None = None, freq_factors: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (float64, ``(dim // 2,)``) and the magnitude factor on cos/sin."""
    if dim % 2:
        raise ValueError(f"rotary dimension must be even, got {dim}")
    scaling = scaling or RopeScaling()
    pair = torch.arange(dim // 2, dtype=torch.float64)
    inv_freq = base ** (-2.0 * pair / dim)
    if freq_factors is not None:
        if freq_factors.shape != (dim // 2,):
            raise ValueError(f"rope frequency factors have shape {tuple(freq_factors.shape)}, expected ({dim // 2},)")
        inv_freq = inv_freq / freq_factors.to(torch.float64).cpu()
    mscale = scaling.attn_factor
    if scaling.kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.kind == "yarn":
        freq_scale = 1.0 / scaling.factor
        n_orig = scaling.original_context_length
        low = max(0.0, math.floor(_yarn_corr_dim(dim, n_orig, scaling.beta_fast, base)))
        high = min(dim - 1.0, math.ceil(_yarn_corr_dim(dim, n_orig, scaling.beta_slow, base)))
        # 1 for fast pairs (kept), 0 for slow pairs (interpolated), a linear ramp between.
        ramp = 1.0 - ((pair - low) / max(0.001, high - low)).clamp(0.0, 1.0)
        mix = ramp * scaling.ext_factor
        inv_freq = inv_freq * freq_scale * (1.0 - mix) + inv_freq * mix
        if scaling.ext_factor != 0.0:
            mscale *= 1.0 + 0.1 * math.log(1.0 / freq_scale)
    return inv_freq, mscale


class RotaryEmbedding(torch.nn.Module):
    """Rotates the first ``dim`` dimensions of each head (``dim`` < head size: partial rotary, the rest pass).

    With ``long_freq_factors`` (LongRoPE) the module holds two frequency sets: ``freq_factors`` (short) serve
    contexts up to the scaling's original context length, the long ones larger contexts. As in llama.cpp the
    choice follows the context the engine allocates (``set_context_length``), not each sequence's length, so the
    keys already in the cache never change their rotation.
    """

    def __init__(
        self,
        dim: int,
        base: float,
        scaling: RopeScaling | None = None,
        freq_factors: torch.Tensor | None = None,
        long_freq_factors: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.dim = dim
        self.base = base
        self.scaling = scaling or RopeScaling()
        self._device = torch.device(device)
        self._short = rope_frequencies(dim, base, self.scaling, freq_factors)
        self._long = None if long_freq_factors is None else rope_frequencies(dim, base, self.scaling, long_freq_factors)
        self.uses_long_factors = False
        self.register_buffer("inv_freq", torch.empty(0), persistent=False)
        self._select(self._short)

    def _select(self, freqs: tuple[torch.Tensor, float]) -> None:
        inv_freq, self.mscale = freqs
        # float64 keeps position * frequency exact to well below float32's resolution at long positions.
        dtype = torch.float64 if self._device.type == "cpu" else torch.float32
        self.inv_freq = inv_freq.to(device=self._device, dtype=dtype)

    def set_context_length(self, n_ctx: int) -> None:
        """Pick the LongRoPE frequency set for a context of ``n_ctx`` positions (no-op without long factors)."""
        if self._long is None:
            return
        self.uses_long_factors = n_ctx > self.scaling.original_context_length
        self._select(self._long if self.uses_long_factors else self._short)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, float32 ``(B, 1, T, dim // 2)``, for integer ``positions`` ``(B, T)``."""
        angles = positions.to(self.inv_freq.dtype).unsqueeze(-1) * self.inv_freq
        cos = (torch.cos(angles) * self.mscale).float().unsqueeze(1)
        sin = (torch.sin(angles) * self.mscale).float().unsqueeze(1)
        return cos, sin

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` ``(B, H, T, head_dim)`` by the angles of ``cos_sin``."""
        half = self.dim // 2
        x1 = x[..., :half].float()
        x2 = x[..., half : self.dim].float()
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
        if self.dim == x.shape[-1]:
            return rotated
        return torch.cat((rotated, x[..., self.dim :]), dim=-1)

    def apply_qk(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``apply`` to the queries and the keys of one attention layer: one fused Triton launch where it applies
        (``orcd.nn.rotary_kernels``; ~14 kernels fewer per layer), else the torch path twice."""
        if self._kernel_applies(q, k, cos, sin):
            from orcd.nn.rotary_kernels import rotary_qk  # lazily: orcd imports without Triton

            return rotary_qk(q, k, cos, sin, self.dim)
        return self.apply(q, cos, sin), self.apply(k, cos, sin)

    def _kernel_applies(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
        """The fused kernel serves these inputs: the shapes ``cos_sin`` and ``SelfAttention`` produce, float
        activations, nothing that needs autograd (the kernel has no backward). Checks shapes only: no host sync."""
        if not use_kernels(q, k, cos, sin):
            return False
        if q.dim() != 4 or k.dim() != 4 or cos.dim() != 4 or cos.shape != sin.shape:
            return False
        b, _, t, d = q.shape
        if k.shape[0] != b or k.shape[2:] != q.shape[2:] or self.dim > d or q.numel() == 0 or k.numel() == 0:
            return False
        c_b, c_h, c_t, c_i = cos.shape
        if c_h != 1 or c_b not in (1, b) or c_t not in (1, t) or c_i != self.dim // 2:
            return False
        if cos.dtype != torch.float32 or sin.dtype != torch.float32 or q.dtype not in _KERNEL_DTYPES \
                or k.dtype not in _KERNEL_DTYPES:
            return False
        return not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))

    def extra_repr(self) -> str:
        long = f", long_factors={self.uses_long_factors}" if self._long is not None else ""
        return f"dim={self.dim}, base={self.base}, mscale={self.mscale:.4g}{long}"
