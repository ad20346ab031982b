"""MXFP4 (OCP microscaling FP4): 32 E2M1 values sharing one E8M0 exponent, as in GPT-OSS expert weights.

Layout: ``e | qs[16]``; value ``j`` is the low nibble of ``qs[j]``, value ``j + 16`` the high nibble. ggml stores
the E2M1 codes doubled (``0, 1, 2, 3, 4, 6, 8, 12`` with bit 3 the sign) and halves the scale instead:
``d = 2**(e - 128)``, built directly as float32 bits (``e < 2`` lands in the subnormal range). ``e = 255`` is
not NaN here: ggml and gguf decode it as ``2**127`` like any other exponent, so large codes overflow to inf.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from orcd.quant import QuantFormat
from orcd_quant_formats.blocks import nibbles, random_bytes
from orcd_quant_formats.kernels import FusedLinear

T = gguf.GGMLQuantizationType

# E2M1 magnitudes doubled; index = 4-bit code (bit 3 = sign). Exactly gguf's ``MXFP4.kvalues``.
E2M1_DOUBLED = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
_LUT_CACHE: dict[torch.device, torch.Tensor] = {}


def _code_table(device: torch.device) -> torch.Tensor:
    """The 16 decoded codes as float32 on ``device`` (cached)."""
    lut = _LUT_CACHE.get(device)
    if lut is None:
        lut = _LUT_CACHE[device] = torch.tensor(E2M1_DOUBLED, dtype=torch.float32, device=device)
    return lut


def e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """``2**(e - 128)`` as float32 for uint8 exponents ``e``: gguf's ``e8m0_to_fp32_half``, bit for bit."""
    e32 = e.to(torch.int32)
    bits = torch.where(e32 < 2, (e32 + 1) << 21, (e32 - 1) << 23)  # e = 0, 1: subnormal bits 0x200000, 0x400000
    return bits.view(torch.float32)


class MXFP4(FusedLinear, QuantFormat):
    ggml_type, block_size, type_size = T.MXFP4, 32, 17

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d = e8m0_half(blocks[:, :1])
        codes = nibbles(blocks[:, 1:]).reshape(-1).to(torch.int32)  # lows are values 0..15, highs 16..31
        k = torch.index_select(_code_table(blocks.device), 0, codes).view(n, 32)  # exact small floats
        return k.mul_(d)

    def quantize(self, values: np.ndarray) -> np.ndarray:
        return gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), T.MXFP4)

    def random_blocks(self, n_blocks: int, rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
        out = random_bytes(rng, n_blocks, self.type_size)
        code_rms = float(np.sqrt(np.mean(np.square(E2M1_DOUBLED))))
        # 2**(e-128) * code_rms ~ scale: round log2 of the target up or down at random (in proportion to its
        # fraction), so blocks vary by a binade and the mean square stays close to scale**2.
        e = np.floor(np.log2(scale / code_rms) + rng.uniform(0.0, 1.0, size=n_blocks)) + 128
        out[:, 0] = np.clip(e, 0, 254).astype(np.uint8)
        return out


MXFP4_FORMATS = (MXFP4,)
