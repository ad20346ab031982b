"""Weight tiles of MXFP4 (layout in ``..mxfp4``): ``G`` half-blocks of 16 values per row, fp32 ``(BN, G, 16)``.

The E2M1 code is decoded arithmetically rather than through a table: magnitude code ``c`` (3 bits) is ggml's doubled
value ``c`` for ``c < 2`` and ``(2 + (c & 1)) << ((c >> 1) - 1)`` otherwise (2, 3, 4, 6, 8, 12); bit 3 is the sign.
The shared scale ``2**(e - 128)`` is built as float32 bits exactly as the torch dequantizer does, so tiles are
bit-exact with gguf, including ``inf`` for the largest exponents.
"""

from __future__ import annotations

import triton
import triton.language as tl

from orcd_quant_formats.kernels.common import masked_bytes
from orcd_quant_formats.kernels.legacy import half_blocks, nibbles


@triton.jit
def mxfp4_tile(w_ptr, row_off, k0, K, G: tl.constexpr):
    block, half, valid = half_blocks(w_ptr, row_off, k0, K, 17, G)
    code = nibbles(block, 1, half, valid)
    exp = (code >> 1) & 3
    mant = code & 1
    mag = tl.where(exp == 0, mant, (2 + mant) << tl.maximum(exp - 1, 0))
    value = tl.where(code >= 8, -mag, mag)
    e = masked_bytes(block, valid)
    scale = tl.where(e < 2, (e + 1) << 21, (e - 1) << 23).to(tl.float32, bitcast=True)
    return value.to(tl.float32) * scale
