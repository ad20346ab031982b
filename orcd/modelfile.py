"""GGUF model files: metadata, the tensor table and raw tensor bytes, validated.

The file is opened with ``gguf.GGUFReader`` (memory-mapped). Its header is parsed by the reader; the tensor table is
built here so that every tensor's data range is checked against the file size before anything is read. Any
problem becomes a ``ModelFileError`` whose message says what is wrong with which file, key or tensor.
"""

from __future__ import annotations

import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from orcd.errors import ModelFileError
from orcd.quant import ggml_type_name

GGUF_MAGIC = b"GGUF"
_MISSING = object()


@dataclass(frozen=True)
class TensorInfo:
    """One row of the tensor table. ``shape`` is in torch order (the last axis is ggml's ne0, the row length)."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    n_bytes: int
    offset: int  # absolute offset of the data in the file

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.ggml_type)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


class _PackedArray:
    """A metadata array read in one pass (see ``_HeaderReader``): numbers as one numpy view, strings as the offsets
    of their bytes (decoded when the metadata is read, so a bad UTF-8 string is reported under its key)."""

    def __init__(self, numbers: np.ndarray | None = None, data: np.ndarray | None = None,
                 spans: list[tuple[int, int]] | None = None) -> None:
        self.numbers, self.data, self.spans = numbers, data, spans

    def values(self) -> list[Any]:
        if self.numbers is not None:
            return self.numbers.tolist()
        assert self.data is not None and self.spans is not None
        raw = self.data
        return [str(raw[a:b].tobytes(), encoding="utf-8") for a, b in self.spans]


class _HeaderReader(gguf.GGUFReader):
    """The gguf reader, stopped before it maps tensor data: ``ModelFile`` builds and bounds-checks that itself.

    Metadata arrays of numbers or strings are read in one pass instead of one numpy view per element, which on a
    201k-token vocabulary with 446k merges (GPT-OSS) takes the header from ~16 s to well under one. Nested arrays,
    and files of the other byte order, take the reader's own walk."""

    def _build_tensors(self, start_offs: int, fields: list) -> None:  # noqa: D401 - overrides the reader's
        self.tensor_fields = fields
        self.tensors = []

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[Any], list[int], list[Any]]:
        T = gguf.GGUFValueType
        if raw_type != T.ARRAY or self.byte_order != "I" or sys.byteorder != "little":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        length = self._get(orig_offs + 4, np.uint64)
        if len(raw_itype) != 1 or len(length) != 1:
            raise ValueError(f"array header at offset {orig_offs} runs past the end of the file")
        n, offs = int(length[0]), orig_offs + 12
        try:
            item = T(int(raw_itype[0]))
        except ValueError:
            return super()._get_field_parts(orig_offs, raw_type)  # the reader's own error for an unknown type
        np_type = self.gguf_scalar_to_np.get(item)
        if np_type is not None:
            if n * np.dtype(np_type).itemsize > len(self.data) - offs:
                raise ValueError(f"array of {n} {item.name} at offset {orig_offs} runs past the end of the file")
            numbers = self._get(offs, np_type, n)
            return 12 + int(numbers.nbytes), [raw_itype, length, _PackedArray(numbers=numbers)], [2], [T.ARRAY, item]
        if item != T.STRING:
            return super()._get_field_parts(orig_offs, raw_type)
        spans, end = _string_spans(self.data, offs, n)
        packed = _PackedArray(data=self.data, spans=spans)
        return end - orig_offs, [raw_itype, length, packed], [2], [T.ARRAY, item]


def _string_spans(data: np.ndarray, offs: int, n: int) -> tuple[list[tuple[int, int]], int]:
    """Byte ranges of ``n`` length-prefixed (uint64, little-endian) strings starting at ``offs``, and where they end;
    ``ValueError`` where one runs past the end of ``data``."""
    size = len(data)
    if n > (size - offs) // 8:
        raise ValueError(f"array of {n} strings at offset {offs} cannot fit in the {size - offs} bytes left")
    raw = memoryview(data)
    unpack = struct.Struct("<Q").unpack_from
    spans = []
    for _ in range(n):
        if offs + 8 > size:
            raise ValueError(f"string length at offset {offs} runs past the end of the file")
        (length,) = unpack(raw, offs)
        start, offs = offs + 8, offs + 8 + length
        if offs > size:
            raise ValueError(f"string of {length} bytes at offset {start} runs past the end of the file")
        spans.append((start, offs))
    return spans, offs


class ModelFile:
    """An opened, structurally valid GGUF file."""

    def __init__(self, path: Path, reader: _HeaderReader, tensors: dict[str, TensorInfo]) -> None:
        self.path = path
        self.reader = reader
        self.tensors = tensors
        self._metadata: dict[str, Any] | None = None

    # --- opening -------------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> "ModelFile":
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"{path}: no such file", path=str(path))
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise ModelFileError(f"{path}: cannot be read ({e.strerror})", path=str(path)) from None
        if magic != GGUF_MAGIC:
            raise ModelFileError(
                f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF file starts with {GGUF_MAGIC!r})",
                path=str(path),
            )
        size = path.stat().st_size
        try:
            reader = _HeaderReader(path, "r")
        except Exception as e:  # the reader raises ValueError, IndexError, ... on a damaged header
            raise ModelFileError(
                f"{path}: the GGUF header is truncated or corrupt ({type(e).__name__}: {e}); the file has "
                f"{size} bytes",
                path=str(path),
            ) from None
        tensors = _tensor_table(path, reader, size)
        mf = cls(path, reader, tensors)
        mf.require("general.architecture")
        return mf

    # --- metadata ------------------------------------------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, Any]:
        """Every key/value pair, decoded to Python values (the reader's own ``GGUF.*`` entries left out)."""
        if self._metadata is None:
            meta: dict[str, Any] = {}
            for key, field in self.reader.fields.items():
                if key.startswith("GGUF."):
                    continue
                try:
                    packed = field.parts[-1] if field.parts else None
                    meta[key] = packed.values() if isinstance(packed, _PackedArray) else field.contents()
                except Exception as e:
                    raise ModelFileError(f"{self.path}: metadata key {key!r} cannot be decoded ({e})") from None
            self._metadata = meta
        return self._metadata

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        value = self.metadata.get(key, _MISSING)
        if value is _MISSING:
            raise ModelFileError(f"{self.path}: required metadata key {key!r} is missing", key=key)
        return value

    @property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))

    def arch_get(self, suffix: str, default: Any = None) -> Any:
        """``{architecture}.{suffix}``, e.g. ``arch_get("context_length")``."""
        return self.get(f"{self.architecture}.{suffix}", default)

    def arch_require(self, suffix: str) -> Any:
        return self.require(f"{self.architecture}.{suffix}")

    @property
    def file_type_name(self) -> str:
        ft = self.get("general.file_type")
        if ft is None:
            return "unknown"
        try:
            return gguf.LlamaFileType(int(ft)).name.removeprefix("MOSTLY_").replace("ALL_", "")
        except ValueError:
            return f"unknown ({ft})"

    # --- tensors -------------------------------------------------------------------------------------------------
    def tensor(self, name: str) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise ModelFileError(f"{self.path}: required tensor {name!r} is missing", tensor=name)
        return info

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the memory map (no copy)."""
        info = self.tensor(name)
        return self.reader.data[info.offset : info.offset + info.n_bytes]


def _tensor_table(path: Path, reader: _HeaderReader, file_size: int) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for field in reader.tensor_fields:
        try:
            _, name_data, _, dims, raw_type, rel_offset = field.parts
            name = bytes(name_data).decode("utf-8")
        except Exception:
            raise ModelFileError(f"{path}: a tensor entry in the header is corrupt") from None
        if name in tensors:
            raise ModelFileError(f"{path}: tensor {name!r} appears twice", tensor=name)
        ggml_type = int(raw_type[0])
        try:
            qtype = gguf.GGMLQuantizationType(ggml_type)
            block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ModelFileError(
                f"{path}: tensor {name!r} has ggml type {ggml_type}, which no version of GGUF defines", tensor=name
            ) from None
        shape = tuple(int(d) for d in reversed(dims.tolist()))
        if any(d <= 0 for d in shape) or shape[-1] % block_size:
            raise ModelFileError(
                f"{path}: tensor {name!r} has shape {shape}, invalid for {qtype.name} (block size {block_size})",
                tensor=name,
            )
        n_bytes = math.prod(shape) // block_size * type_size
        offset = int(reader.data_offset) + int(rel_offset[0])
        if offset % reader.alignment or offset + n_bytes > file_size:
            raise ModelFileError(
                f"{path}: tensor {name!r} data is out of bounds: it needs bytes {offset}..{offset + n_bytes} but "
                f"the file has {file_size} bytes (truncated download?)",
                tensor=name,
            )
        tensors[name] = TensorInfo(name=name, ggml_type=ggml_type, shape=shape, n_bytes=n_bytes, offset=offset)
    return tensors
