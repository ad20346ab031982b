"""Unquantized storage types: F32, F16, BF16 (block size 1)."""

import gguf
import numpy as np
import torch

from orcd.quant import QuantFormat


class F32(QuantFormat):
    ggml_type, block_size, type_size = gguf.GGMLQuantizationType.F32, 1, 4

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(torch.float32).reshape(-1, 1)

    def quantize(self, values: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(values, dtype=np.float32).view(np.uint8)


class F16(QuantFormat):
    ggml_type, block_size, type_size = gguf.GGMLQuantizationType.F16, 1, 2

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(torch.float16).float().reshape(-1, 1)

    def quantize(self, values: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(values, dtype=np.float32).astype(np.float16).view(np.uint8)


class BF16(QuantFormat):
    ggml_type, block_size, type_size = gguf.GGMLQuantizationType.BF16, 1, 2

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(torch.bfloat16).float().reshape(-1, 1)

    def quantize(self, values: np.ndarray) -> np.ndarray:
        return gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), gguf.GGMLQuantizationType.BF16)
