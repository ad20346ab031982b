"""orcd-quant-formats: ggml block formats, dequantized with torch (CPU and CUDA), bit-exact with gguf's numpy code."""

from orcd_quant_formats.floats import BF16, F16, F32

ALL_FORMATS = (F32, F16, BF16)
