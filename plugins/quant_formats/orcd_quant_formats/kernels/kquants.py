"""Weight tiles of the K-quants Q4_K, Q5_K and Q6_K (layouts in ``..kquants``), fp32 ``(BN, G, L)``.

A tile covers ``G`` sub-blocks of one super-block (``G * L`` divides 256; callers step through whole super-blocks
and rows are whole super-blocks long, so no tile is partial): Q4_K/Q5_K sub-blocks of 32 (``L = 32``), Q6_K
sub-blocks of 16 (``L = 16``). Values follow gguf's float32 operations (``(d*sc)*q - (dmin*m)``, ``(d*sc)*q``), so
tiles are bit-exact with the reference dequantizers.
"""

from __future__ import annotations

import triton
import triton.language as tl

from orcd_quant_formats.kernels.common import load_bytes, load_f16


@triton.jit
def sub_blocks(w_ptr, row_off, k0, TYPE_SIZE: tl.constexpr, SUB: tl.constexpr, G: tl.constexpr):
    """A pointer to each row's super-block ``(BN, 1, 1)`` and the index of each sub-block in it ``(1, G, 1)``."""
    block = w_ptr + row_off[:, None, None] + (k0 // 256) * TYPE_SIZE
    return block, (k0 % 256) // SUB + tl.arange(0, G)[None, :, None]


@triton.jit
def scale_min(block, s):
    """Sub-block ``s``'s 6-bit scale and min from the 12 packed bytes at offset 4 (see ``unpack_scale_min``)."""
    j = s % 4
    a = load_bytes(block + 4 + j)
    b = load_bytes(block + 8 + j)
    c = load_bytes(block + 12 + j)
    low = s < 4
    sc = tl.where(low, a & 63, (c & 15) | ((a >> 6) << 4))
    mn = tl.where(low, b & 63, (c >> 4) | ((b >> 6) << 4))
    return sc, mn


@triton.jit
def scaled_with_min(block, s, q):
    sc, mn = scale_min(block, s)
    dl = load_f16(block) * sc.to(tl.float32)
    ml = load_f16(block + 2) * mn.to(tl.float32)
    return q.to(tl.float32) * dl - ml


@triton.jit
def q4_k_tile(w_ptr, row_off, k0, K, G: tl.constexpr):
    block, s = sub_blocks(w_ptr, row_off, k0, 144, 32, G)
    j = tl.arange(0, 32)[None, None, :]
    q = (load_bytes(block + 16 + (s // 2) * 32 + j) >> ((s % 2) * 4)) & 15
    return scaled_with_min(block, s, q)


@triton.jit
def q5_k_tile(w_ptr, row_off, k0, K, G: tl.constexpr):
    block, s = sub_blocks(w_ptr, row_off, k0, 176, 32, G)
    j = tl.arange(0, 32)[None, None, :]
    low = (load_bytes(block + 48 + (s // 2) * 32 + j) >> ((s % 2) * 4)) & 15
    high = (load_bytes(block + 16 + j) >> s) & 1
    return scaled_with_min(block, s, low | (high << 4))


@triton.jit
def q6_k_tile(w_ptr, row_off, k0, K, G: tl.constexpr):
    # Value v = 16 u + i of the super-block (sub-block u): half h = v // 128, field f = (v % 128) // 32 and byte
    # j = v % 32; its low 4 bits are nibble f // 2 of ql[64 h + 32 (f % 2) + j], its high 2 bits field f of
    # qh[32 h + j].
    block, u = sub_blocks(w_ptr, row_off, k0, 210, 16, G)
    h = u // 8
    f = (u % 8) // 2
    j = (u % 2) * 16 + tl.arange(0, 16)[None, None, :]
    low = (load_bytes(block + h * 64 + (f % 2) * 32 + j) >> ((f // 2) * 4)) & 15
    high = (load_bytes(block + 128 + h * 32 + j) >> (f * 2)) & 3
    q = (low | (high << 4)) - 32
    sc = tl.load(block + 192 + u).to(tl.int8, bitcast=True).to(tl.float32)
    return q.to(tl.float32) * (load_f16(block + 208) * sc)
