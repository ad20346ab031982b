"""A model file checked against the installed plugins, and what ``orcd inspect`` reports about it."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from pydantic import BaseModel

from orcd.arch import ModelConfig
from orcd.modelfile import ModelFile
from orcd.plugins import OrcdPluginManager, check_model_supported, get_plugin_manager


class TensorRow(BaseModel):
    name: str
    type: str
    shape: list[int]
    bytes: int


class ModelDescription(BaseModel):
    path: str
    architecture: str
    name: str
    file_type: str
    parameter_count: int
    tensor_count: int
    tensor_types: dict[str, int]
    context_length: int
    vocab_size: int
    has_chat_template: bool
    weights_bytes: int
    kv_cache_bytes: int  # FP16 K and V for one sequence at the full context length
    estimated_gpu_bytes: int  # weights as stored + KV cache
    config: dict


def open_checked(path: str | Path, plugins: OrcdPluginManager | None = None) -> tuple[ModelFile, ModelConfig]:
    """Open ``path`` and check everything the installed plugins need before a load: architecture, every tensor's
    type, the config's metadata and the required tensors. Raises ``ModelFileError``/``QuantError``."""
    plugins = plugins or get_plugin_manager()
    model = ModelFile.open(path)
    check_model_supported(model, plugins)
    arch = plugins.architecture(model.architecture)
    config = arch.config(model)
    for name in arch.required_tensors(config):
        model.tensor(name)
    return model, config


def describe(path: str | Path, plugins: OrcdPluginManager | None = None) -> ModelDescription:
    model, config = open_checked(path, plugins)
    weights = sum(t.n_bytes for t in model.tensors.values())
    kv = config.kv_cache_bytes()
    return ModelDescription(
        path=str(model.path),
        architecture=model.architecture,
        name=config.name,
        file_type=model.file_type_name,
        parameter_count=sum(math.prod(t.shape) for t in model.tensors.values()),
        tensor_count=len(model.tensors),
        tensor_types=dict(sorted(Counter(t.type_name for t in model.tensors.values()).items())),
        context_length=config.context_length,
        vocab_size=config.vocab_size,
        has_chat_template=bool(model.get("tokenizer.chat_template")),
        weights_bytes=weights,
        kv_cache_bytes=kv,
        estimated_gpu_bytes=weights + kv,
        config=config.model_dump(),
    )


def tensor_table(model: ModelFile) -> list[TensorRow]:
    return [TensorRow(name=t.name, type=t.type_name, shape=list(t.shape), bytes=t.n_bytes) for t in model.tensors.values()]
