"""What Qwen2 and Phi-3 read the same way: rope scaling metadata, and loading tensors as layers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from orcd.errors import ModelFileError
from orcd.nn import RMSNorm, RopeScaling
from orcd.quant import QuantizedLinear

if TYPE_CHECKING:
    from orcd.modelfile import ModelFile
    from orcd.plugins import OrcdPluginManager

_SCALING_KINDS = {"": "none", "none": "none", "linear": "linear", "yarn": "yarn"}


def rope_scaling_metadata(model: "ModelFile") -> dict[str, float | int | str]:
    """The ``{arch}.rope.scaling.*`` keys as config fields (llama.cpp's defaults when absent: no scaling)."""
    kind = str(model.arch_get("rope.scaling.type", "none")).lower()
    if kind not in _SCALING_KINDS:
        raise ModelFileError(
            f"{model.path}: {model.architecture}.rope.scaling.type is {kind!r}; supported: none, linear, yarn",
            key=f"{model.architecture}.rope.scaling.type",
        )
    return {
        "rope_scaling_type": _SCALING_KINDS[kind],
        "rope_scaling_factor": float(model.arch_get("rope.scaling.factor", 1.0) or 1.0),
        "rope_original_context_length": int(model.arch_get("rope.scaling.original_context_length", 0)),
        "rope_attn_factor": float(model.arch_get("rope.scaling.attn_factor", 1.0)),
    }


def rope_scaling(config: object) -> RopeScaling:
    kind = getattr(config, "rope_scaling_type")
    factor = getattr(config, "rope_scaling_factor")
    return RopeScaling(
        kind="none" if kind == "linear" and factor == 1.0 else kind,
        factor=factor,
        original_context_length=getattr(config, "rope_original_context_length"),
        attn_factor=getattr(config, "rope_attn_factor"),
    )


class TensorLoader:
    """Reads one file's tensors onto a device: linear weights stay quantized, norms and biases become float32."""

    def __init__(self, model: "ModelFile", device: torch.device, plugins: "OrcdPluginManager") -> None:
        self.model, self.device, self.plugins = model, device, plugins

    def has(self, name: str) -> bool:
        return name in self.model.tensors

    def quantized(self, name: str):
        return self.plugins.quantized_tensor(self.model, name, self.device)

    def dense(self, name: str) -> torch.Tensor:
        return self.plugins.dense_tensor(self.model, name, self.device)

    def linear(self, name: str, bias: str | None = None) -> QuantizedLinear:
        return QuantizedLinear(self.quantized(name), self.dense(bias) if bias else None)

    def norm(self, name: str, eps: float) -> RMSNorm:
        return RMSNorm(self.dense(name), eps)
