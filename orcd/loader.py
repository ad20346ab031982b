"""Loading a model: validate the file against the installed plugins, then build the tokenizer, the chat template
and the module on the device. Everything the engine and the commands need comes back in one ``LoadedModel``."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from orcd.arch import CausalLM, ModelConfig
from orcd.description import open_checked
from orcd.device import parse_device
from orcd.errors import ModelFileError
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


def load_tokenizer(model: ModelFile, tokenizer_path: str | Path | None = None) -> Any:
    """The GGUF's own vocabulary, or a Hugging Face ``tokenizer.json`` (file or directory) given instead."""
    from orcd.tokenizer import Tokenizer

    if tokenizer_path is not None:
        tokenizer = Tokenizer.from_file(tokenizer_path, model)
        n_rows = model.tensor("token_embd.weight").shape[0] if "token_embd.weight" in model.tensors else None
        if n_rows is not None and tokenizer.vocab_size > n_rows:
            raise ModelFileError(f"{tokenizer_path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                                 f"embedding has {n_rows} rows; it belongs to another model", path=str(tokenizer_path))
        return tokenizer
    return Tokenizer.from_gguf(model)


def load_chat_template(model: ModelFile, tokenizer_path: str | Path | None = None) -> Any:
    """The chat template of the Hugging Face tokenizer directory when one is given and has a template, else the
    GGUF's; None when neither has one (then only plain prompts can be served)."""
    from orcd.chat import ChatTemplate

    if tokenizer_path is not None:
        directory = Path(tokenizer_path) if Path(tokenizer_path).is_dir() else Path(tokenizer_path).parent
        if (directory / "chat_template.jinja").is_file() or "chat_template" in _json_keys(
                directory / "tokenizer_config.json"):
            return ChatTemplate.from_hf_config(directory)
    if not model.get("tokenizer.chat_template"):
        return None
    return ChatTemplate.from_gguf(model)


def _json_keys(path: Path) -> set[str]:
    try:
        return set(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return set()


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    plugins: OrcdPluginManager | None = None,
    progress: Progress | None = None,
    tokenizer_path: str | Path | None = None,
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
    tokenizer = load_tokenizer(model, tokenizer_path)
    chat_template = load_chat_template(model, tokenizer_path)
    report(50, "tokenizer and chat template ready")
    module = plugins.architecture(config.architecture).build(model, config, dev, plugins)
    module.eval()
    report(75, f"weights loaded on {dev}")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    report(100, "ready")
    return LoadedModel(Path(path), model, config, module, tokenizer, chat_template, dev, time.perf_counter() - started)
