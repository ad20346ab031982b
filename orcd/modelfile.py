"""GGUF model files: metadata, the tensor table and raw tensor bytes, validated.

The file is opened with ``gguf.GGUFReader`` (memory-mapped). Its header is parsed by the reader; the tensor table is
built here so that every tensor's data range is checked against the file size before anything is read. Any
problem becomes a ``ModelFileError`` whose message says what is wrong with which file, key or tensor.
"""

from __future__ import annotations

import math
import os
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


class _HeaderReader(gguf.GGUFReader):
    """The gguf reader, stopped before it maps tensor data: ``ModelFile`` builds and bounds-checks that itself."""

    def _build_tensors(self, start_offs: int, fields: list) -> None:  # noqa: D401 - overrides the reader's
        self.tensor_fields = fields
        self.tensors = []


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
                    meta[key] = field.contents()
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
