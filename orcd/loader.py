"""Loading a model: validate the file against the installed plugins, then build the tokenizer, the chat template
and the module on the device. Everything the engine and the commands need comes back in one ``LoadedModel``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from orcd.arch import CausalLM, ModelConfig
from orcd.description import open_checked
from orcd.device import parse_device
from orcd.modelfile import ModelFile
from orcd.plugins import OrcdPluginManager, get_plugin_manager

Progress = Callable[[int, str], None]


@dataclass
class LoadedModel:
    path: Path
    model_file: ModelFile
    config: ModelConfig
    module: CausalLM
    tokenizer: Any  # orcd.tokenizer.Tokenizer
    chat_template: Any  # orcd.chat.ChatTemplate, or None when the file has no template
    device: torch.device
    load_seconds: float


def load_tokenizer(model: ModelFile) -> Any:
    from orcd.tokenizer import Tokenizer

    return Tokenizer.from_gguf(model)


def load_chat_template(model: ModelFile) -> Any:
    """The file's chat template, or None when it has none (then only plain prompts can be served)."""
    from orcd.chat import ChatTemplate

    if not model.get("tokenizer.chat_template"):
        return None
    return ChatTemplate.from_gguf(model)


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    plugins: OrcdPluginManager | None = None,
    progress: Progress | None = None,
) -> LoadedModel:
    """Open, validate and build ``path`` on ``device``. ``progress(percent, message)`` is called at 0, 25, 50, 75
    and 100. Raises ``ModelFileError``/``QuantError`` for a file that cannot be served, ``InvalidRequest`` for a
    device that does not exist."""
    report = progress or (lambda percent, message: None)
    started = time.perf_counter()
    plugins = plugins or get_plugin_manager()
    dev = parse_device(device)
    report(0, f"opening {path}")
    model, config = open_checked(path, plugins)
    report(25, f"{config.architecture} model checked: {len(model.tensors)} tensors, {model.file_type_name}")
    tokenizer = load_tokenizer(model)
    chat_template = load_chat_template(model)
    report(50, "tokenizer and chat template ready")
    module = plugins.architecture(config.architecture).build(model, config, dev, plugins)
    module.eval()
    report(75, f"weights loaded on {dev}")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    report(100, "ready")
    return LoadedModel(Path(path), model, config, module, tokenizer, chat_template, dev, time.perf_counter() - started)
