"""The plugin manager: built-ins through the hooks, attribution, clashes, the allow-list, entry-point discovery of
a third-party package installed by the test itself, and `orcd plugins`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import pytest
import torch

import orcd
from orcd.arch import Architecture, ModelConfig
from orcd.errors import ModelFileError, PluginError, QuantError
from orcd.plugins import OrcdPluginManager
from orcd.quant import QuantFormat
from orcd.sampling import SamplerFactory

from conftest import make_plugin_manager


class _DummyArch(Architecture):
    name = "dummy"

    def config(self, model):  # pragma: no cover - never loaded
        raise NotImplementedError

    def required_tensors(self, config: ModelConfig) -> list[str]:
        return []

    def build(self, model, config, device, plugins):  # pragma: no cover
        raise NotImplementedError


class _ArchPlugin:
    @orcd.hookimpl
    def register_architectures(self, register):
        register(_DummyArch())


class _F32Again(QuantFormat):
    ggml_type, block_size, type_size = gguf.GGMLQuantizationType.F32, 1, 4

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.view(torch.float32).reshape(-1, 1)


class _QuantPlugin:
    @orcd.hookimpl
    def register_quant_formats(self, register):
        register(_F32Again())


def test_builtins_register_through_the_sampler_hook() -> None:
    pm = OrcdPluginManager(load_entry_points=False)
    assert {"temperature", "top_k", "top_p", "min_p", "repetition_penalty"} <= set(pm.samplers)
    assert pm.info["orcd.sampling"].samplers == list(pm.samplers)
    assert all(isinstance(f, SamplerFactory) for f in pm.sampler_factories())


def test_registrations_are_attributed_to_their_plugin() -> None:
    pm = make_plugin_manager("quant_formats", "llama_adapter")
    assert "qwen2" in pm.info["llama_adapter"].architectures
    assert {"F32", "F16", "BF16"} <= set(pm.info["quant_formats"].quant_formats)
    assert pm.architecture("qwen2").name == "qwen2"


def test_two_plugins_claiming_one_architecture_is_an_error_naming_both() -> None:
    pm = OrcdPluginManager(load_entry_points=False)
    pm.register(_ArchPlugin(), name="first")
    with pytest.raises(PluginError) as e:
        pm.register(_ArchPlugin(), name="second")
    assert "'dummy'" in str(e.value) and "'first'" in str(e.value) and "'second'" in str(e.value)


def test_two_plugins_claiming_one_quant_type_is_an_error_naming_both() -> None:
    pm = make_plugin_manager("quant_formats")
    with pytest.raises(PluginError) as e:
        pm.register(_QuantPlugin(), name="my_floats")
    assert "F32" in str(e.value) and "quant_formats" in str(e.value) and "my_floats" in str(e.value)


def test_missing_architecture_and_quant_type_name_what_is_installed() -> None:
    pm = make_plugin_manager("quant_formats")
    with pytest.raises(ModelFileError, match=r"'llama4'.*installed architectures: none"):
        pm.architecture("llama4")
    with pytest.raises(QuantError, match=r"'blk.0.ffn_up.weight'.*IQ2_XXS"):
        pm.quant_format(gguf.GGMLQuantizationType.IQ2_XXS, "blk.0.ffn_up.weight")


def test_allow_list_limits_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCD_PLUGINS", "quant_formats")
    pm = OrcdPluginManager()
    assert "quant_formats" in pm.info
    assert "llama_adapter" not in pm.info and not pm.architectures
    monkeypatch.setenv("ORCD_PLUGINS", "")
    pm = OrcdPluginManager()
    assert set(pm.info) == {"orcd.sampling"}  # built-ins always stay


THIRD_PARTY_PLUGIN = '''
import torch
import orcd
from orcd.sampling import SamplerFactory


class BanToken(SamplerFactory):
    """Never picks token 0: an example of a third-party sampler joining the chain."""
    name, order = "ban_token_zero", 150

    def create(self, params):
        def apply(logits, history):
            logits[0] = float("-inf")
            return logits
        return apply


@orcd.hookimpl
def register_samplers(register):
    register(BanToken())


@orcd.hookimpl
def request_finished(event):
    pass
'''


@pytest.mark.slow
def test_a_third_party_package_is_discovered_through_its_entry_point(tmp_path: Path) -> None:
    src = tmp_path / "orcd-ban-token"
    (src / "orcd_ban_token").mkdir(parents=True)
    (src / "orcd_ban_token" / "__init__.py").write_text(THIRD_PARTY_PLUGIN)
    (src / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "orcd-ban-token"
        version = "1.2.3"
        dependencies = ["orcd"]

        [project.entry-points.orcd]
        ban_token = "orcd_ban_token"
    """))
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(src)],
        check=True, capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    env.pop("ORCD_PLUGINS", None)
    out = subprocess.run([sys.executable, "-m", "orcd.cli", "plugins", "--json"], env=env, check=True,
                         capture_output=True, text=True).stdout
    listed = {p["name"]: p for p in json.loads(out)}
    assert listed["ban_token"]["distribution"] == "orcd-ban-token"
    assert listed["ban_token"]["version"] == "1.2.3"
    assert listed["ban_token"]["samplers"] == ["ban_token_zero"]
    assert listed["ban_token"]["hooks"] == ["register_samplers", "request_finished"]

    text = subprocess.run([sys.executable, "-m", "orcd.cli", "plugins"], env=env, check=True,
                          capture_output=True, text=True).stdout
    assert "ban_token (orcd-ban-token 1.2.3)" in text and "samplers: ban_token_zero" in text

    env["ORCD_PLUGINS"] = "orcd-quant-formats"  # the allow-list also takes distribution names
    out = subprocess.run([sys.executable, "-m", "orcd.cli", "plugins", "--json"], env=env, check=True,
                         capture_output=True, text=True).stdout
    assert "ban_token" not in {p["name"] for p in json.loads(out)}


def test_a_plugin_that_fails_to_import_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    class _BrokenEntryPoint:
        name, dist = "broken", None

        def load(self):
            raise ImportError("No module named 'torchvision'")

    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [_BrokenEntryPoint()])
    with pytest.raises(PluginError, match=r"plugin 'broken'.*torchvision"):
        OrcdPluginManager()


def test_unregister_removes_the_plugin_and_what_it_registered() -> None:
    pm = OrcdPluginManager(load_entry_points=False)
    pm.register(_ArchPlugin(), name="first")
    pm.unregister("first")
    assert "dummy" not in pm.architectures and "first" not in pm.info
    pm.register(_ArchPlugin(), name="second")  # the name is free again: no clash with the removed plugin
    assert pm.info["second"].architectures == ["dummy"]
    with pytest.raises(PluginError, match="no plugin named 'first'"):
        pm.unregister("first")
