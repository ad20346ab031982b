"""The plugin manager: built-ins and installed plugins, and the registry of what they added.

The core's own parts (the built-in samplers) are registered through the same hooks as any plugin. Installed plugins
are found in the entry-point group ``orcd``; the environment variable ``ORCD_PLUGINS`` (a comma-separated list of
entry-point or distribution names; empty for none) restricts which are loaded. Each ``register`` call is attributed
to the plugin that made it, so a clash names both plugins.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

import pluggy
import torch

from orcd import hookspecs
from orcd.errors import ModelFileError, PluginError, QuantError
from orcd.quant import QuantFormat, QuantizedTensor, ggml_type_name

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "orcd"
ALLOW_ENV = "ORCD_PLUGINS"
BUILTIN_MODULES = ("orcd.sampling",)


@dataclass
class PluginInfo:
    name: str
    distribution: str | None = None
    version: str | None = None
    architectures: list[str] = field(default_factory=list)
    quant_formats: list[str] = field(default_factory=list)
    samplers: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)


class OrcdPluginManager:
    """Owns the pluggy manager and the registries filled by the ``register_*`` hooks."""

    def __init__(self, load_entry_points: bool = True, allow: list[str] | None = None) -> None:
        self.pm = pluggy.PluginManager("orcd")
        self.pm.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}
        self.architectures: dict[str, Any] = {}
        self.quant_formats: dict[int, QuantFormat] = {}
        self.samplers: dict[str, Any] = {}
        self._owner: dict[tuple[str, Any], str] = {}
        for module_name in BUILTIN_MODULES:
            self.register(importlib.import_module(module_name), name=module_name)
        if load_entry_points:
            self.load_entry_points(allow if allow is not None else _allow_list_from_env())

    # --- loading -------------------------------------------------------------------------------------------------
    def load_entry_points(self, allow: list[str] | None = None) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else None
            if allow is not None and ep.name not in allow and dist not in allow:
                continue
            try:
                plugin = ep.load()
            except Exception as e:
                raise PluginError(f"plugin {ep.name!r} ({dist}) failed to import: {type(e).__name__}: {e}") from e
            self.register(plugin, name=ep.name, distribution=dist, version=ep.dist.version if ep.dist else None)

    def register(
        self,
        plugin: ModuleType | object,
        name: str | None = None,
        distribution: str | None = None,
        version: str | None = None,
    ) -> None:
        """Register one plugin and run its ``register_*`` hooks at once."""
        name = name or getattr(plugin, "__name__", None) or repr(plugin)
        if name in self.info:
            raise PluginError(f"a plugin named {name!r} is already registered")
        self.pm.register(plugin, name=name)
        info = PluginInfo(name=name, distribution=distribution, version=version)
        info.hooks = sorted(impl.name for impl in self.pm.get_hookcallers(plugin) or [])
        self.info[name] = info
        for impl in self.pm.hook.register_architectures.get_hookimpls():
            if impl.plugin_name == name:
                impl.function(register=self._registrar("architecture", name))
        for impl in self.pm.hook.register_quant_formats.get_hookimpls():
            if impl.plugin_name == name:
                impl.function(register=self._registrar("quant format", name))
        for impl in self.pm.hook.register_samplers.get_hookimpls():
            if impl.plugin_name == name:
                impl.function(register=self._registrar("sampler", name))

    def unregister(self, name: str) -> None:
        """Remove a plugin, its hook implementations and everything it registered."""
        if self.info.pop(name, None) is None:
            raise PluginError(f"no plugin named {name!r} is registered")
        self.pm.unregister(name=name)
        tables = {"architecture": self.architectures, "quant format": self.quant_formats, "sampler": self.samplers}
        for (kind, key), owner in list(self._owner.items()):
            if owner == name:
                del self._owner[(kind, key)]
                tables[kind].pop(key, None)

    def _registrar(self, kind: str, plugin_name: str) -> Callable[[Any], None]:
        def register(item: Any) -> None:
            if kind == "architecture":
                key, table, label, listing = item.name, self.architectures, item.name, "architectures"
            elif kind == "quant format":
                key, table, label, listing = int(item.ggml_type), self.quant_formats, item.name, "quant_formats"
            else:
                key, table, label, listing = item.name, self.samplers, item.name, "samplers"
            owner = self._owner.get((kind, key))
            if owner is not None:
                raise PluginError(
                    f"{kind} {label!r} is registered by two plugins: {owner!r} and {plugin_name!r}; "
                    f"uninstall one or leave it out of {ALLOW_ENV}"
                )
            self._owner[(kind, key)] = plugin_name
            table[key] = item
            getattr(self.info[plugin_name], listing).append(label)

        return register

    # --- look-ups ------------------------------------------------------------------------------------------------
    @property
    def hook(self) -> Any:
        return self.pm.hook

    def architecture(self, name: str) -> Any:
        arch = self.architectures.get(name)
        if arch is None:
            installed = ", ".join(sorted(self.architectures)) or "none"
            raise ModelFileError(
                f"no installed plugin supports architecture {name!r} (installed architectures: {installed}); "
                "install the adapter plugin for it",
                architecture=name,
            )
        return arch

    def quant_format(self, ggml_type: int, tensor_name: str = "?") -> QuantFormat:
        fmt = self.quant_formats.get(int(ggml_type))
        if fmt is None:
            installed = ", ".join(sorted(f.name for f in self.quant_formats.values())) or "none"
            raise QuantError(
                f"tensor {tensor_name!r} has type {ggml_type_name(ggml_type)}, which no installed quant-format "
                f"plugin supports (supported: {installed}); install orcd-quant-formats",
                tensor=tensor_name,
            )
        return fmt

    def sampler_factories(self) -> list[Any]:
        return list(self.samplers.values())

    def quantized_tensor(self, model: Any, name: str, device: Any = "cpu") -> QuantizedTensor:
        """Load tensor ``name`` of ``model`` (a ``ModelFile``) onto ``device``, still quantized."""
        info = model.tensor(name)
        fmt = self.quant_format(info.ggml_type, name)
        return QuantizedTensor.from_raw(name, model.raw(name), fmt, info.shape, device)

    def dense_tensor(
        self, model: Any, name: str, device: Any = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Load tensor ``name`` dequantized (for norms, biases and other small tensors)."""
        qt = self.quantized_tensor(model, name, device)
        return qt.dequantize(dtype)


def _allow_list_from_env() -> list[str] | None:
    value = os.environ.get(ALLOW_ENV)
    if value is None:
        return None
    return [p.strip() for p in value.split(",") if p.strip()]


_default: OrcdPluginManager | None = None


def get_plugin_manager() -> OrcdPluginManager:
    """The process-wide manager with every installed (and allowed) plugin loaded."""
    global _default
    if _default is None:
        _default = OrcdPluginManager()
    return _default


def check_model_supported(model: Any, plugins: OrcdPluginManager) -> None:
    """Raise the first reason ``model`` cannot be loaded with the installed plugins."""
    plugins.architecture(model.architecture)
    for info in model.tensors.values():
        plugins.quant_format(info.ggml_type, info.name)
    if not model.tensors:
        raise ModelFileError(f"{model.path}: the file holds no tensors")
