"""Synthetic GGUF models: random weights with the real tensor names, metadata, tokenizer and chat template.

The architecture plugin describes the model (``Architecture.synth_spec(preset)``); the quant-format plugins encode
the tensors; ``filetypes`` picks each tensor's ggml type as llama.cpp would. Small models quantize random normal
values (so logits are meaningful for reference tests); large ones write random valid blocks directly, streaming one
tensor at a time, so a 12 GiB file takes minutes and little memory.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np

from orcd.arch import SynthSpec, SynthTensor
from orcd.plugins import OrcdPluginManager, get_plugin_manager
from orcd.testing.filetypes import FILE_TYPES, tensor_type

# Below this many parameters a model is written from quantized random values, above it from random blocks.
VALUES_MAX_PARAMS = 64 * 1024 * 1024


def synthesize(
    path: str | Path,
    architecture: str,
    preset: str = "tiny",
    file_type: str = "F32",
    seed: int = 0,
    plugins: OrcdPluginManager | None = None,
    from_values: bool | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write a synthetic model file and return its path."""
    plugins = plugins or get_plugin_manager()
    arch = plugins.architecture(architecture)
    if preset not in arch.synth_presets:
        raise ValueError(f"architecture {architecture!r} has no preset {preset!r}; it has {', '.join(arch.synth_presets)}")
    if file_type not in FILE_TYPES:
        raise ValueError(f"unknown file type {file_type!r}; known: {', '.join(FILE_TYPES)}")
    spec: SynthSpec = arch.synth_spec(preset)
    n_layers = max((t.layer for t in spec.tensors if t.layer is not None), default=-1) + 1
    tied = not any(t.role == "output" for t in spec.tensors)
    n_expert = max((t.shape[0] for t in spec.tensors if t.role.startswith("expert_")), default=0)
    types = {t.name: tensor_type(file_type, t, n_layers, tied, n_expert) for t in spec.tensors}
    formats = {name: plugins.quant_format(int(q), name) for name, q in types.items()}
    if from_values is None:
        from_values = sum(math.prod(t.shape) for t in spec.tensors) <= VALUES_MAX_PARAMS

    path = Path(path)
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_file_type(int(FILE_TYPES[file_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in spec.metadata.items():
        _add_metadata(writer, key, value)
    _write_tokenizer(writer, spec)
    for t in spec.tensors:
        fmt = formats[t.name]
        row_bytes = t.shape[-1] // fmt.block_size * fmt.type_size  # the writer takes the shape in bytes
        writer.add_tensor_info(
            t.name, (*t.shape[:-1], row_bytes), np.dtype(np.uint8), math.prod(t.shape[:-1]) * row_bytes,
            raw_dtype=types[t.name],
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    started = time.monotonic()
    for i, t in enumerate(spec.tensors):
        writer.write_tensor_data(_tensor_bytes(t, formats[t.name], rng, from_values))
        if progress:
            progress(f"[{i + 1}/{len(spec.tensors)}] {t.name} {types[t.name].name} ({time.monotonic() - started:.1f}s)")
    writer.close()
    return path


def _tensor_bytes(t: SynthTensor, fmt: Any, rng: np.random.Generator, from_values: bool) -> np.ndarray:
    n = math.prod(t.shape)
    if from_values or len(t.shape) == 1 or fmt.block_size == 1:
        values = (rng.standard_normal(n, dtype=np.float32) * t.std + t.mean).reshape(-1, t.shape[-1])
        raw = fmt.quantize(values)
    else:
        raw = fmt.random_blocks(n // fmt.block_size, rng, scale=t.std)
    return np.ascontiguousarray(raw).reshape(-1)


def _add_metadata(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], gguf.GGUFValueType):
        writer.add_key_value(key, value[0], value[1])
    elif isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        raise TypeError(f"metadata {key!r}: cannot write a {type(value).__name__}")


def _write_tokenizer(writer: gguf.GGUFWriter, spec: SynthSpec) -> None:
    from orcd.testing.vocab import write_tokenizer  # the tokenizer vocabulary and chat template

    write_tokenizer(writer, spec)
