"""Quantized storage: the format protocol plugins implement, tensors that stay quantized, and the linear layer.

A ``QuantizedTensor`` keeps a weight's raw ggml blocks (uint8) on its device, one row of blocks per output row, with
the logical torch shape beside it. ``QuantizedLinear`` multiplies by it without ever materialising the whole matrix:
the reference path dequantizes a bounded tile of rows at a time; a format may instead supply a fused kernel through
``QuantFormat.linear`` (the one seam per format for later performance work).
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from typing import ClassVar

import gguf
import numpy as np
import torch

from orcd.errors import QuantError

# Tiles of the reference path hold at most this many dequantized elements (16 Mi float32 = 64 MiB).
REFERENCE_TILE_ELEMENTS = 16 * 1024 * 1024


def ggml_type_name(ggml_type: int) -> str:
    try:
        return gguf.GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"unknown ggml type {ggml_type}"


class QuantFormat(ABC):
    """One ggml storage type. Subclasses set the three class attributes and implement ``dequantize``.

    Blocks are rows of ``type_size`` bytes that decode to ``block_size`` values; a tensor row holds
    ``row_length // block_size`` consecutive blocks. Float types are formats too (block size 1).
    """

    ggml_type: ClassVar[int]  # a gguf.GGMLQuantizationType
    block_size: ClassVar[int]  # values per block
    type_size: ClassVar[int]  # bytes per block

    @property
    def name(self) -> str:
        return ggml_type_name(self.ggml_type)

    @abstractmethod
    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        """Decode ``blocks`` (uint8, shape ``(n_blocks, type_size)``, any device) to float32 of shape
        ``(n_blocks, block_size)`` on the same device, bit-exact with ``gguf.quants.dequantize``."""

    def quantize(self, values: np.ndarray) -> np.ndarray:
        """Encode float32 ``values`` (last axis a multiple of ``block_size``) to uint8 blocks, last axis
        ``n * type_size``. Used to write synthetic model files; optional."""
        raise NotImplementedError(f"{self.name} has no quantizer")

    def random_blocks(self, n_blocks: int, rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
        """``n_blocks`` valid blocks (uint8, ``(n_blocks, type_size)``) whose values are roughly of magnitude
        ``scale``. Used to write large synthetic files quickly; the default quantizes random normals."""
        values = rng.standard_normal(n_blocks * self.block_size, dtype=np.float32) * scale
        return self.quantize(values.reshape(n_blocks, self.block_size)).reshape(n_blocks, self.type_size)

    def linear(
        self, x: torch.Tensor, weight: "QuantizedTensor", bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        """A fused dequantize-matmul ``x @ W.T + bias`` for this format, or ``None`` to use the reference path."""
        return None

    def expert_linear(
        self, x: torch.Tensor, weight: "QuantizedTensor", ids: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Mixture-of-experts seam: ``weight`` is 3-D ``(n_expert, rows, cols)``; row ``p`` of ``x (P, cols)`` goes
        through expert ``ids[p]`` (``ids (P,)``), giving ``(P, rows)``. ``None`` means: use the reference path."""
        return None

    def row_bytes(self, row_length: int, tensor_name: str = "?") -> int:
        if row_length % self.block_size:
            raise QuantError(
                f"tensor {tensor_name!r}: row length {row_length} is not a multiple of the {self.name} block "
                f"size {self.block_size}",
                tensor=tensor_name,
            )
        return row_length // self.block_size * self.type_size


class QuantizedTensor:
    """A tensor kept in its ggml encoding: ``data`` is uint8 ``(rows, row_bytes)``, ``shape`` the logical torch
    shape (last axis = row length, as ggml's ne0)."""

    def __init__(self, name: str, data: torch.Tensor, fmt: QuantFormat, shape: tuple[int, ...]) -> None:
        self.name = name
        self.data = data
        self.fmt = fmt
        self.shape = tuple(int(s) for s in shape)

    @classmethod
    def from_raw(
        cls,
        name: str,
        raw: np.ndarray | bytes | memoryview,
        fmt: QuantFormat,
        shape: tuple[int, ...],
        device: torch.device | str = "cpu",
    ) -> "QuantizedTensor":
        """Wrap raw ggml bytes, checking that their length fits ``shape`` and the format; copies to ``device``."""
        shape = tuple(int(s) for s in shape)
        if not shape or any(s <= 0 for s in shape):
            raise QuantError(f"tensor {name!r}: invalid shape {shape}", tensor=name)
        row_length = shape[-1]
        n_rows = math.prod(shape[:-1])
        row_bytes = fmt.row_bytes(row_length, name)
        buf = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else raw.reshape(-1).view(np.uint8)
        if buf.size != n_rows * row_bytes:
            raise QuantError(
                f"tensor {name!r}: {buf.size} bytes of data, but shape {shape} in {fmt.name} needs "
                f"{n_rows * row_bytes} bytes",
                tensor=name,
            )
        with warnings.catch_warnings():  # a read-only memory map: safe, the bytes are copied before any use
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            host = torch.from_numpy(np.ascontiguousarray(buf).reshape(n_rows, row_bytes))
        return cls(name, host.to(device, copy=True), fmt, shape)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def n_rows(self) -> int:
        return self.data.shape[0]

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice | None = None) -> torch.Tensor:
        """Decode all rows (in the logical shape) or the given slice of rows (shape ``(n, row_length)``)."""
        data = self.data if rows is None else self.data[rows]
        n = data.shape[0]
        blocks = data.reshape(-1, self.fmt.type_size)
        values = self.fmt.dequantize(blocks).reshape(n, self.shape[-1]).to(dtype)
        return values.reshape(self.shape) if rows is None else values

    def tile_rows(self) -> int:
        """Rows per tile of the reference path, so that a tile stays under ``REFERENCE_TILE_ELEMENTS``."""
        return max(1, min(self.n_rows, REFERENCE_TILE_ELEMENTS // self.shape[-1]))

    def __repr__(self) -> str:
        return f"QuantizedTensor({self.name!r}, {self.fmt.name}, shape={self.shape}, device={self.device})"


class QuantizedLinear(torch.nn.Module):
    """``y = x @ W.T + b`` with ``W`` a 2-D ``QuantizedTensor`` of shape ``(out_features, in_features)``."""

    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise QuantError(f"tensor {weight.name!r}: a linear weight must be 2-D, got shape {weight.shape}")
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.weight.fmt.linear(x, self.weight, self.bias)
        if fused is not None:
            return fused
        return reference_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.weight.fmt.name}, bias={self.bias is not None}"


def stack_linears(name: str, linears: list[QuantizedLinear]) -> QuantizedLinear | None:
    """One linear whose output rows are those of ``linears`` in order (a fused QKV, a fused gate|up), so a decode
    step launches one kernel where it launched several. ``None`` where they cannot share one weight: different
    formats, input widths or devices. The rows are copied (the originals are freed once unreferenced); a missing
    bias among biased ones contributes zeros."""
    first = linears[0].weight
    if any(lin.weight.fmt.ggml_type != first.fmt.ggml_type or lin.in_features != first.shape[1]
           or lin.weight.data.device != first.data.device or lin.weight.data.dim() != 2 for lin in linears):
        return None
    data = torch.cat([lin.weight.data for lin in linears], dim=0)
    rows = sum(lin.out_features for lin in linears)
    bias = None
    if any(lin.bias is not None for lin in linears):
        ref = next(lin.bias for lin in linears if lin.bias is not None)
        bias = torch.cat([lin.bias if lin.bias is not None else ref.new_zeros(lin.out_features) for lin in linears])
    return QuantizedLinear(QuantizedTensor(name, data, first.fmt, (rows, first.shape[1])), bias)


def reference_linear(x: torch.Tensor, weight: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Dequantize ``weight`` a tile of rows at a time and multiply; the CPU path and the oracle for kernels."""
    n_out = weight.n_rows
    tile = weight.tile_rows()
    if tile >= n_out:
        out = x @ weight.dequantize(x.dtype).T
    else:
        out = x.new_empty(*x.shape[:-1], n_out)
        for start in range(0, n_out, tile):
            rows = slice(start, min(start + tile, n_out))
            out[..., rows] = x @ weight.dequantize(x.dtype, rows).T
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out
