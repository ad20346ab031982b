"""Shared fixtures: a plugin manager with the project's plugins registered explicitly (tests never autoload
entry points), synthetic model files, and the rule that reference tests may skip locally but never in CI."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

from orcd.plugins import OrcdPluginManager

PROJECT_PLUGINS = {
    "quant_formats": "orcd_quant_formats.plugin",
    "llama_adapter": "orcd_llama_adapter.plugin",
    "gpt_adapter": "orcd_gpt_adapter.plugin",
}
IN_CI = os.environ.get("CI", "").lower() == "true"


def make_plugin_manager(*names: str) -> OrcdPluginManager:
    """A manager with the built-ins and the named project plugins (all of them when none are named)."""
    pm = OrcdPluginManager(load_entry_points=False)
    for name in names or tuple(PROJECT_PLUGINS):
        pm.register(importlib.import_module(PROJECT_PLUGINS[name]), name=name)
    return pm


@pytest.fixture(scope="session")
def plugins() -> OrcdPluginManager:
    return make_plugin_manager()


def require_reference(module: str) -> ModuleType:
    """Import a reference implementation (llama_cpp, transformers). Missing: skip locally, fail in CI."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if IN_CI:
            pytest.fail(f"reference {module!r} is not installed in CI ({e}); .ci/run must install it")
        pytest.skip(f"reference {module!r} is not installed")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synth")


@pytest.fixture(scope="session")
def synth_model(synth_dir: Path, plugins: OrcdPluginManager):
    """``synth_model(arch, file_type, preset="tiny")`` → path of a synthetic GGUF, written once per session."""
    from orcd.testing.synth import synthesize

    cache: dict[tuple[str, str, str], Path] = {}

    def make(arch: str, file_type: str = "F32", preset: str = "tiny") -> Path:
        key = (arch, file_type, preset)
        if key not in cache:
            cache[key] = synthesize(synth_dir / f"{arch}-{preset}-{file_type}.gguf", arch, preset, file_type,
                                    plugins=plugins)
        return cache[key]

    return make


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
