"""YaRN as GPT-OSS was trained with it: the correction range not rounded to whole pairs.

Both references agree on everything but one detail. The attention factor is ``1 + 0.1 ln(factor)`` on cos and sin in
both (ggml's ``rope_yarn`` with the file's attn_factor 1; HF's ``get_mscale(factor)``). The ramp between the kept
(fast) and the interpolated (slow) pairs runs between the pair indices where a pair turns ``beta_fast`` and
``beta_slow`` times over the original context: llama.cpp floors/ceils those bounds (``ggml_rope_yarn_corr_dims``,
8 and 18 for GPT-OSS), while OpenAI's reference and HF's ``GptOssConfig`` (``truncate: False``) keep them as they
are (8.09 and 17.40). ``orcd.nn.rope_frequencies`` computes llama.cpp's variant; this module supplies the other, so
a config can choose (``GptOssConfig.rope_yarn_truncate``).
"""

from __future__ import annotations

import math

import torch

from orcd.nn import RopeScaling, RotaryEmbedding, rope_frequencies


def correction_dim(dim: int, n_orig: int, n_rot: float, base: float) -> float:
    """The pair index whose wavelength turns ``n_rot`` times over ``n_orig`` positions."""
    return dim * math.log(n_orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))


def yarn_frequencies(dim: int, base: float, scaling: RopeScaling, truncate: bool) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (float64, ``(dim // 2,)``) and the cos/sin magnitude of YaRN; ``truncate`` rounds the
    correction range outwards to whole pairs as llama.cpp does."""
    if scaling.kind != "yarn":
        raise ValueError(f"yarn_frequencies needs YaRN scaling, got {scaling.kind!r}")
    if truncate:
        return rope_frequencies(dim, base, scaling)
    n_orig = scaling.original_context_length
    low = max(0.0, correction_dim(dim, n_orig, scaling.beta_fast, base))
    high = min(dim - 1.0, correction_dim(dim, n_orig, scaling.beta_slow, base))
    pair = torch.arange(dim // 2, dtype=torch.float64)
    inv_freq = base ** (-2.0 * pair / dim)
    # 1 for fast pairs (extrapolated: kept), 0 for slow pairs (interpolated), linear between.
    keep = (1.0 - ((pair - low) / max(0.001, high - low)).clamp(0.0, 1.0)) * scaling.ext_factor
    inv_freq = inv_freq / scaling.factor * (1.0 - keep) + inv_freq * keep
    mscale = scaling.attn_factor
    if scaling.ext_factor != 0.0:
        mscale *= 1.0 + 0.1 * math.log(scaling.factor)
    return inv_freq, mscale


def yarn_rotary(dim: int, base: float, scaling: RopeScaling, truncate: bool,
                device: torch.device | str = "cpu") -> RotaryEmbedding:
    """The core's ``RotaryEmbedding`` with GPT-OSS's frequencies (the core's own when ``truncate``)."""
    rotary = RotaryEmbedding(dim, base, scaling, device=device)
    if not truncate:
        inv_freq, rotary.mscale = yarn_frequencies(dim, base, scaling, truncate=False)
        rotary.inv_freq = inv_freq.to(device=rotary.inv_freq.device, dtype=rotary.inv_freq.dtype)
    return rotary
