"""orcd-quant-formats: ggml block formats, dequantized with torch (CPU and CUDA), bit-exact with gguf's numpy code."""

from orcd_quant_formats.floats import BF16, F16, F32
from orcd_quant_formats.kquants import K_FORMATS, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
from orcd_quant_formats.legacy import LEGACY_FORMATS, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
from orcd_quant_formats.mxfp4 import MXFP4, MXFP4_FORMATS

ALL_FORMATS = (F32, F16, BF16, *LEGACY_FORMATS, *K_FORMATS, *MXFP4_FORMATS)

__all__ = [
    "ALL_FORMATS", "BF16", "F16", "F32", "MXFP4", "Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K",
    "Q6_K", "Q8_0",
]
