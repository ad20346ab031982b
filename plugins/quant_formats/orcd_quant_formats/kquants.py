"""K-quants: super-blocks of 256 values in sub-blocks of 16 or 32, sub-block scales quantized against fp16
super-scales.

Layouts (bytes, in order):

- Q2_K ``scales[16] | qs[64] | d | dmin``: 16 sub-blocks of 16; scale byte = ``sc | m << 4``; 2-bit ``q``;
  value ``(d*sc)*q - (dmin*m)``.
- Q3_K ``hmask[32] | qs[64] | scales[12] | d``: 16 sub-blocks of 16; 6-bit signed scales (``sc - 32``) packed
  low nibbles in bytes 0..7, high 2 bits in bytes 8..11; ``q = ql - 4`` where the hmask bit is 0 (``ql`` when 1);
  value ``(d*sc)*q``.
- Q4_K ``d | dmin | scales[12] | qs[128]``: 8 sub-blocks of 32; 6-bit scales and mins packed in 12 bytes (see
  ``unpack_scale_min``); value ``(d*sc)*q - (dmin*m)``.
- Q5_K ``d | dmin | scales[12] | qh[32] | qs[128]``: as Q4_K with a fifth bit from ``qh``.
- Q6_K ``ql[128] | qh[64] | scales[16] | d``: 16 sub-blocks of 16; int8 scales; ``q`` 6-bit minus 32; value
  ``(d*sc)*q``.

Bit order of the packed quants (what the reshapes below follow): a 4-bit ``qs`` of 32*k bytes holds, per group of
32 bytes, the low nibbles of one sub-block of 32 then the high nibbles of the next; 2-bit and 1-bit fields run
lowest bits first across a group of 32 (Q2_K/Q3_K: 128 values per 32 bytes). As in gguf, ``d*sc`` and
``(d*sc)*q`` are float32 products; both are exact (fp16's 11 significant bits times at most 8 + 6 bits of codes
fit float32's 24), so the one rounding is the subtraction of the min term, and bit-exactness rests on the layout
and on computing in float32.

Quantizers follow the idea of llama.cpp's reference quantizers (nothing is ported line by line): for each
sub-block, try a small grid of candidate scales, refit scale (and min) by weighted least squares for the levels each
candidate gives, keep the best; then quantize the sub-block scales against a super-block scale and requantize the
values with the scales as they will be decoded.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from orcd.quant import QuantFormat
from orcd_quant_formats.blocks import block_scales, f16, low_bits, nibbles, put_f16, random_bytes, rms
from orcd_quant_formats.kernels import FusedLinear

T = gguf.GGMLQuantizationType
QK_K = 256


# --- dequantizers ---------------------------------------------------------------------------------------------------


def unpack_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 scale bytes -> eight 6-bit scales and eight 6-bit mins, each ``(n, 8)`` uint8.

    Bytes 0..3: scale j (low 6 bits) and bits 4..5 of scale j+4 (top 2 bits); bytes 4..7: the same for mins;
    bytes 8..11: low nibble = low 4 bits of scale j+4, high nibble = low 4 bits of min j+4.
    """
    a, b, c = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat((a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)), dim=1)
    mn = torch.cat((b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)), dim=1)
    return sc, mn


def unpack_q3_scales(scales: torch.Tensor) -> torch.Tensor:
    """Q3_K's 12 scale bytes -> sixteen 6-bit scales (still offset by 32), ``(n, 16)`` uint8."""
    n = scales.shape[0]
    low = nibbles(scales[:, :8]).reshape(n, 16)
    high = low_bits(scales[:, 8:12], 2).reshape(n, 16)
    return low | (high << 4)


class Q2_K(QuantFormat):
    ggml_type, block_size, type_size = T.Q2_K, QK_K, 84

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        scales = blocks[:, :16]
        dl = (f16(blocks, 80) * (scales & 0x0F).float()).reshape(n, 16, 1)
        ml = (f16(blocks, 82) * (scales >> 4).float()).reshape(n, 16, 1)
        q = low_bits(blocks[:, 16:80].reshape(2 * n, 32), 2).reshape(n, 16, 16).float()
        return q.mul_(dl).sub_(ml).reshape(n, QK_K)

    def quantize(self, values: np.ndarray) -> np.ndarray:
        return _quantize_rows(values, _q2_k_blocks, self.type_size)

    def random_blocks(self, n_blocks: int, rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
        out = random_bytes(rng, n_blocks, self.type_size)
        sc = rng.integers(8, 16, size=(n_blocks, 16), dtype=np.uint8)
        mn = np.rint(sc * 0.75).astype(np.uint8)  # dmin = 2d: min ~ 1.5 levels, centring q in 0..3
        out[:, :16] = sc | (mn << 4)
        d = block_scales(rng, n_blocks, scale, rms(np.arange(8, 16)) * rms(np.arange(4) - 1.5))
        put_f16(out, 80, d)
        put_f16(out, 82, 2 * d)
        return out


class Q3_K(QuantFormat):
    ggml_type, block_size, type_size = T.Q3_K, QK_K, 110

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        sc = unpack_q3_scales(blocks[:, 96:108]).to(torch.int8) - 32
        dl = (f16(blocks, 108) * sc.float()).reshape(n, 16, 1)
        ql = low_bits(blocks[:, 32:96].reshape(2 * n, 32), 2).reshape(n, 16, 16)
        hm = low_bits(blocks[:, :32], 1).reshape(n, 16, 16)
        q = ql.to(torch.int8) - ((hm ^ 1) << 2).to(torch.int8)
        return q.float().mul_(dl).reshape(n, QK_K)

    def quantize(self, values: np.ndarray) -> np.ndarray:
        return _quantize_rows(values, _q3_k_blocks, self.type_size)

    def random_blocks(self, n_blocks: int, rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
        out = random_bytes(rng, n_blocks, self.type_size)  # random 6-bit scales and quants
        put_f16(out, 108, block_scales(rng, n_blocks, scale, rms(np.arange(-32, 32)) * rms(np.arange(-4, 4))))
        return out


class Q4_K(FusedLinear, QuantFormat):
    ggml_type, block_size, type_size = T.Q4_K, QK_K, 144

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        sc, mn = unpack_scale_min(blocks[:, 4:16])
        dl = (f16(blocks, 0) * sc.float()).reshape(n, 8, 1)
        ml = (f16(blocks, 2) * mn.float()).reshape(n, 8, 1)
        q = nibbles(blocks[:, 16:].reshape(4 * n, 32)).reshape(n, 8, 32).float()
        return q.mul_(dl).sub_(ml).reshape(n, QK_K)

    def quantize(self, values: np.ndarray) -> np.ndarray:
        return _quantize_rows(values, _q4_k_blocks, self.type_size)

    def random_blocks(self, n_blocks: int, rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
        return _random_scale_min_blocks(self, n_blocks, rng, scale, nmax=15)


class Q5_K(FusedLinear, QuantFormat):
    ggml_type, block_size, type_size = T.Q5_K, QK_K, 176

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        sc, mn = unpack_scale_min(blocks[:, 4:16])
        dl = (f16(blocks, 0) * sc.float()).reshape(n, 8, 1)
        ml = (f16(blocks, 2) * mn.float()).reshape(n, 8, 1)
        ql = nibbles(blocks[:, 48:].reshape(4 * n, 32)).reshape(n, 8, 32)
        qh = low_bits(blocks[:, 16:48], 1)  # (n, 8, 32): bit s of qh[j] is bit 4 of value 32*s + j
        q = (ql | (qh << 4)).float()
        return q.mul_(dl).sub_(ml).reshape(n, QK_K)

    def quantize(self, values: np.ndarray) -> np.ndarray:
        return _quantize_rows(values, _q5_k_blocks, self.type_size)

    def random_blocks(self, n_blocks: int, rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
        return _random_scale_min_blocks(self, n_blocks, rng, scale, nmax=31)


class Q6_K(FusedLinear, QuantFormat):
    ggml_type, block_size, type_size = T.Q6_K, QK_K, 210

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        dl = (f16(blocks, 208) * blocks[:, 192:208].view(torch.int8).float()).reshape(n, 16, 1)
        # Per half of 128 values: ql is 64 bytes (lows = values 0..63, highs = 64..127); qh is 32 bytes of four
        # 2-bit fields (field s of byte j -> value 32*s + j).
        ql = nibbles(blocks[:, :128].reshape(2 * n, 64)).reshape(n, 8, 32)
        qh = low_bits(blocks[:, 128:192].reshape(2 * n, 32), 2).reshape(n, 8, 32)
        q = (ql | (qh << 4)).to(torch.int8) - 32
        return q.reshape(n, 16, 16).float().mul_(dl).reshape(n, QK_K)

    def quantize(self, values: np.ndarray) -> np.ndarray:
        return _quantize_rows(values, _q6_k_blocks, self.type_size)

    def random_blocks(self, n_blocks: int, rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
        out = random_bytes(rng, n_blocks, self.type_size)  # random int8 scales and 6-bit quants
        put_f16(out, 208, block_scales(rng, n_blocks, scale, rms(np.arange(-128, 128)) * rms(np.arange(-32, 32))))
        return out


def _random_scale_min_blocks(
    fmt: QuantFormat, n_blocks: int, rng: np.random.Generator, scale: float, nmax: int
) -> np.ndarray:
    """Random Q4_K/Q5_K blocks whose sub-block mins sit near the middle of the level range, so values are
    centred on zero as real weights are; ``dmin = d * (nmax + 1) / 2`` keeps the min codes within 6 bits."""
    out = random_bytes(rng, n_blocks, fmt.type_size)
    sc = rng.integers(32, 64, size=(n_blocks, 8))
    ratio = (nmax + 1) / 2  # dmin = ratio * d, so m = sc * (nmax / 2) / ratio stays below 64
    mn = np.rint(sc * (nmax / 2) / ratio)
    out[:, 4:16] = pack_scale_min(sc, mn)
    d = block_scales(rng, n_blocks, scale, rms(np.arange(32, 64)) * rms(np.arange(nmax + 1) - nmax / 2))
    put_f16(out, 0, d)
    put_f16(out, 2, ratio * d)
    return out


# --- quantizers (numpy) ---------------------------------------------------------------------------------------------


def pack_scale_min(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Inverse of ``unpack_scale_min``: eight 6-bit scales and mins ``(n, 8)`` -> 12 bytes ``(n, 12)``."""
    sc = np.asarray(sc, dtype=np.uint8)
    mn = np.asarray(mn, dtype=np.uint8)
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def pack_q3_scales(sc: np.ndarray) -> np.ndarray:
    """Inverse of ``unpack_q3_scales``: sixteen 6-bit codes ``(n, 16)`` -> 12 bytes ``(n, 12)``."""
    sc = np.asarray(sc, dtype=np.uint8)
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, :8] = (sc[:, :8] & 0x0F) | ((sc[:, 8:] & 0x0F) << 4)
    hi = (sc >> 4).reshape(-1, 4, 4)  # field k of byte j is scale 4*k + j
    out[:, 8:12] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    return out


def pack_low_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of ``low_bits``: ``(n, 8 // bits, m)`` fields -> ``(n, m)`` bytes."""
    q = np.asarray(q, dtype=np.uint8)
    out = np.zeros((q.shape[0], q.shape[2]), dtype=np.uint8)
    for k in range(q.shape[1]):
        out |= q[:, k] << (k * bits)
    return out


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Inverse of ``nibbles``: ``(n, 2, m)`` -> ``(n, m)``."""
    q = np.asarray(q, dtype=np.uint8)
    return q[:, 0] | (q[:, 1] << 4)


def _quantize_rows(values: np.ndarray, quantize_blocks, type_size: int, chunk: int = 2048) -> np.ndarray:
    """Quantize ``values`` (last axis a multiple of 256) super-block by super-block, in chunks to bound memory."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.shape[-1] % QK_K:
        raise ValueError(f"row length {values.shape[-1]} is not a multiple of {QK_K}")
    flat = values.reshape(-1, QK_K)
    out = np.empty((flat.shape[0], type_size), dtype=np.uint8)
    for start in range(0, flat.shape[0], chunk):
        out[start : start + chunk] = quantize_blocks(flat[start : start + chunk])
    return out.reshape(*values.shape[:-1], values.shape[-1] // QK_K * type_size)


def _levels(inv: np.ndarray, x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """``clip(round(inv * x), lo, hi)`` for every candidate: ``inv (S, C)``, ``x (S, L)`` -> float32 ``(S, C, L)``,
    computed in place (this array is the bulk of a quantizer's memory and time)."""
    q = inv.astype(np.float32)[..., None] * x[:, None, :]
    np.rint(q, out=q)
    return np.clip(q, lo, hi, out=q)


def _weighted_sums(q: np.ndarray, *weights: np.ndarray) -> list[np.ndarray]:
    """``sum_l q[s, c, l] * w[s, l]`` for each ``w`` (batched mat-vec products), as float64 ``(S, C)``."""
    return [np.matmul(q, w[:, :, None])[..., 0].astype(np.float64) for w in weights]


def fit_scale_min(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, absolute: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and min per sub-block (rows of ``x``) for ``x ~ scale * q - min``, ``q`` in ``0..nmax``, ``min >= 0``.

    Candidates: the plain min/max mapping, and inverse scales ``(nmax + rmin + rdelta * i) / (max - min)`` for
    ``i = 0..nstep``; each candidate's levels are refit by weighted least squares ``x ~ scale * q + offset`` with
    ``offset <= 0`` (the format stores ``-offset`` unsigned). The least weighted squared (or, for ``absolute``,
    absolute) error wins.
    """
    x = x.astype(np.float32)
    w = w.astype(np.float32)
    lo = np.minimum(x.min(-1), 0.0)
    span = x.max(-1) - lo
    flat = span <= 0
    span = np.where(flat, 1.0, span).astype(np.float64)
    steps = np.concatenate(([float(nmax)], nmax + rmin + rdelta * np.arange(nstep + 1)))
    inv = steps[None, :] / span[:, None]  # (S, C)
    q = _levels(inv, x - lo[:, None], 0, nmax)
    sw, sx, sxx = (np.sum(v, -1, dtype=np.float64)[:, None] for v in (w, w * x, w * x * x))
    sq, sxq = _weighted_sums(q, w, w * x)
    np.square(q, out=q)
    (sqq,) = _weighted_sums(q, w)
    np.sqrt(q, out=q)  # back to the levels (exact: small integers)

    det = sw * sqq - sq * sq
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(det > 0, (sw * sxq - sx * sq) / det, 0.0)
        offset = np.where(det > 0, (sqq * sx - sq * sxq) / det, 0.0)
        scale_only = np.where(sqq > 0, sxq / sqq, 0.0)  # a positive offset is not representable: refit without
    positive = offset > 0
    scale = np.where(positive, scale_only, scale)
    offset = np.where(positive, 0.0, offset)
    # The first candidate keeps its plain mapping, a fallback that a degenerate fit never beats.
    scale[:, 0] = 1.0 / inv[:, 0]
    offset[:, 0] = lo
    if absolute:
        err = scale.astype(np.float32)[..., None] * q + offset.astype(np.float32)[..., None] - x[:, None, :]
        cost = np.matmul(np.abs(err), w[:, :, None])[..., 0]
    else:  # sum w (scale q + offset - x)^2, expanded into the sums above
        cost = (scale * scale * sqq + 2 * scale * offset * sq + offset * offset * sw
                - 2 * scale * sxq - 2 * offset * sx + sxx)
    best = np.argmin(cost, axis=1)
    pick = np.arange(x.shape[0])
    scale, offset = scale[pick, best], offset[pick, best]
    return np.where(flat, 0.0, scale), np.where(flat, -lo, -offset)


def fit_symmetric(x: np.ndarray, nmax: int, nstep: int = 9, rdelta: float = 0.1) -> np.ndarray:
    """Signed scale per sub-block for ``x ~ scale * q``, ``q`` in ``-nmax..nmax-1``.

    The largest-magnitude value maps to ``-nmax`` (the side with one more level), so the scale has the opposite
    sign to it. Candidates ``-(nmax + rdelta * i) / amax`` for ``|i| <= nstep`` are refit by least squares weighted
    with ``x**2``; the fit that reduces the weighted error most wins.
    """
    x = x.astype(np.float32)
    imax = np.abs(x).argmax(-1)
    vmax = np.take_along_axis(x, imax[:, None], -1)[:, 0].astype(np.float64)
    zero = vmax == 0
    vmax = np.where(zero, 1.0, vmax)
    inv = -(nmax + rdelta * np.arange(-nstep, nstep + 1))[None, :] / vmax[:, None]  # (S, C)
    q = _levels(inv, x, -nmax, nmax - 1)
    w = x * x
    (sxq,) = _weighted_sums(q, w * x)
    np.square(q, out=q)
    (sqq,) = _weighted_sums(q, w)
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.where(sqq > 0, sxq * sxq / sqq, -1.0)  # error reduction of the least-squares fit
        scale = np.where(sqq > 0, sxq / sqq, 0.0)
    best = np.argmax(gain, axis=1)
    return np.where(zero, 0.0, scale[np.arange(x.shape[0]), best])


def _quantize_against(values: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantize non-negative sub-block ``values`` ``(n, k)`` to integers ``0..limit`` against one super-scale per
    row: returns ``codes`` and the super-scale (fp16-rounded, as stored)."""
    top = values.max(-1)
    with np.errstate(divide="ignore"):
        inv = np.where(top > 0, limit / top, 0.0)
    codes = np.clip(np.rint(values * inv[:, None]), 0, limit).astype(np.uint8)
    return codes, (top / limit).astype(np.float16)


def _requantize(x: np.ndarray, dl: np.ndarray, ml: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Final levels ``round((x + ml) / dl)`` in ``lo..hi`` with the decoded sub-block scales (0 where ``dl == 0``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint((x + ml[..., None]) / dl[..., None])
    q = np.where(dl[..., None] != 0, q, 0)
    return np.clip(q, lo, hi).astype(np.int16)


def _scale_min_levels(
    blocks: np.ndarray, sub: int, nmax: int, scale_bits: int, rmin: float, nstep: int, mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shared body of Q2_K/Q4_K/Q5_K: fit, quantize sub-scales, requantize. Returns ``q (n, S, sub)``, the scale
    and min codes ``(n, S)`` and fp16 ``d, dmin`` ``(n,)``."""
    n = blocks.shape[0]
    x = blocks.reshape(-1, sub).astype(np.float32)
    if mad:  # Q2_K: plain magnitude weights, absolute error
        w = np.abs(x)
    else:  # weigh every value by the sub-block RMS plus its own magnitude
        w = np.sqrt(np.mean(x * x, axis=-1, keepdims=True)) + np.abs(x)
    scale, mn = fit_scale_min(x, w, nmax, rmin=rmin, rdelta=0.1, nstep=nstep, absolute=mad)
    limit = (1 << scale_bits) - 1
    sc, d = _quantize_against(scale.reshape(n, -1), limit)
    mc, dmin = _quantize_against(mn.reshape(n, -1), limit)
    dl = d.astype(np.float32)[:, None] * sc.astype(np.float32)
    ml = dmin.astype(np.float32)[:, None] * mc.astype(np.float32)
    q = _requantize(x.reshape(n, -1, sub), dl, ml, 0, nmax)
    return q, sc, mc, d, dmin


def _q4_k_blocks(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    q, sc, mc, d, dmin = _scale_min_levels(blocks, 32, 15, 6, rmin=-1.0, nstep=20, mad=False)
    out = np.empty((n, 144), dtype=np.uint8)
    put_f16(out, 0, d)
    put_f16(out, 2, dmin)
    out[:, 4:16] = pack_scale_min(sc, mc)
    out[:, 16:] = pack_nibbles(q.reshape(n * 4, 2, 32)).reshape(n, 128)
    return out


def _q5_k_blocks(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    q, sc, mc, d, dmin = _scale_min_levels(blocks, 32, 31, 6, rmin=-0.5, nstep=15, mad=False)
    out = np.empty((n, 176), dtype=np.uint8)
    put_f16(out, 0, d)
    put_f16(out, 2, dmin)
    out[:, 4:16] = pack_scale_min(sc, mc)
    out[:, 16:48] = pack_low_bits(q >> 4, 1)
    out[:, 48:] = pack_nibbles((q & 15).reshape(n * 4, 2, 32)).reshape(n, 128)
    return out


def _q2_k_blocks(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    q, sc, mc, d, dmin = _scale_min_levels(blocks, 16, 3, 4, rmin=-0.5, nstep=15, mad=True)
    out = np.empty((n, 84), dtype=np.uint8)
    out[:, :16] = sc | (mc << 4)
    out[:, 16:80] = pack_low_bits(q.reshape(n * 2, 4, 32), 2).reshape(n, 64)
    put_f16(out, 80, d)
    put_f16(out, 82, dmin)
    return out


def _signed_levels(blocks: np.ndarray, nmax: int, code_max: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shared body of Q3_K/Q6_K: symmetric fits per 16 values, signed sub-scale codes in ``-code_max-1..code_max``
    against an fp16 super-scale, requantized levels in ``-nmax..nmax-1``. Returns ``q (n, 16, 16)``, the codes
    ``(n, 16)`` and ``d (n,)``."""
    n = blocks.shape[0]
    x = blocks.reshape(-1, 16).astype(np.float32)
    scale = fit_symmetric(x, nmax).reshape(n, 16)
    # The largest-magnitude sub-scale maps to -(code_max + 1), the side with one more code (as for the levels).
    imax = np.abs(scale).argmax(-1)
    top = np.take_along_axis(scale, imax[:, None], -1)[:, 0]
    with np.errstate(divide="ignore"):
        inv = np.where(top != 0, -(code_max + 1) / top, 0.0)
    codes = np.clip(np.rint(scale * inv[:, None]), -code_max - 1, code_max).astype(np.int16)
    with np.errstate(divide="ignore"):
        d = np.where(inv != 0, 1.0 / inv, 0.0).astype(np.float16)
    dl = d.astype(np.float32)[:, None] * codes.astype(np.float32)
    q = _requantize(x.reshape(n, 16, 16), dl, np.zeros_like(dl), -nmax, nmax - 1)
    return q, codes, d


def _q6_k_blocks(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    q, codes, d = _signed_levels(blocks, 32, 127)
    u = (q + 32).astype(np.uint8).reshape(n * 2, 128)  # per half: values 0..127
    out = np.empty((n, 210), dtype=np.uint8)
    out[:, :128] = pack_nibbles((u & 15).reshape(n * 2, 2, 64)).reshape(n, 128)
    out[:, 128:192] = pack_low_bits((u >> 4).reshape(n * 2, 4, 32), 2).reshape(n, 64)
    out[:, 192:208] = codes.astype(np.int8).view(np.uint8)
    put_f16(out, 208, d)
    return out


def _q3_k_blocks(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    q, codes, d = _signed_levels(blocks, 4, 31)
    u = (q + 4).astype(np.uint8).reshape(n, 256)
    out = np.empty((n, 110), dtype=np.uint8)
    out[:, :32] = pack_low_bits((u >> 2).reshape(n, 8, 32), 1)  # hmask bit set = no -4 offset
    out[:, 32:96] = pack_low_bits((u & 3).reshape(n * 2, 4, 32), 2).reshape(n, 64)
    out[:, 96:108] = pack_q3_scales((codes + 32).astype(np.uint8))
    put_f16(out, 108, d)
    return out


K_FORMATS = (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)
