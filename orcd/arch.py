"""The architecture protocol: what a plugin implements to teach orcd a model family.

An ``Architecture`` reads a GGUF file's metadata into a typed ``ModelConfig``, names the tensors it needs, builds
the torch module (``CausalLM``) from the file's tensors on a device, and describes synthetic files of its family
for tests and benchmarks (``synth_spec``). See ``docs/writing-plugins.md`` and ``plugins/llama_adapter``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from orcd.modelfile import ModelFile
    from orcd.plugins import OrcdPluginManager


class ModelConfig(BaseModel):
    """The hyper-parameters every decoder-only transformer has; architectures subclass it to add their own."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    architecture: str
    name: str = ""
    context_length: int
    embedding_length: int
    block_count: int
    head_count: int
    head_count_kv: int
    head_dim: int
    vocab_size: int
    feed_forward_length: int
    rms_norm_eps: float
    rope_freq_base: float

    def kv_cache_bytes(self, n_ctx: int | None = None, bytes_per_element: int = 2) -> int:
        """Bytes of a K and V cache for one sequence of ``n_ctx`` tokens (default: the full context) in FP16."""
        n_ctx = self.context_length if n_ctx is None else n_ctx
        return 2 * self.block_count * self.head_count_kv * self.head_dim * n_ctx * bytes_per_element

    def kv_read_bytes(self, n_ctx: int, bytes_per_element: int = 2) -> int:
        """Bytes of K and V one decode step of a sequence at ``n_ctx`` tokens reads: all of its cache here; a
        config whose layers attend over less (a sliding window) says so by overriding this."""
        return self.kv_cache_bytes(n_ctx, bytes_per_element)


class CausalLM(torch.nn.Module):
    """The module an architecture builds. The engine owns the KV cache and calls ``forward(batch: ForwardBatch,
    all_logits=False)``: the calling convention is documented in ``orcd/nn/batch.py`` (``orcd.nn.decoder.DecoderLM`` is a
    ready-made pre-norm decoder that follows it)."""

    config: ModelConfig


@dataclass(frozen=True)
class SynthTensor:
    """A tensor of a synthetic model: GGUF name, torch-order shape, and its role (which decides its ggml type
    under a file type: ``norm``, ``bias``, ``token_embd``, ``output``, ``attn_q``, ``attn_k``, ``attn_v``,
    ``attn_qkv``, ``attn_output``, ``ffn_gate``, ``ffn_up``, ``ffn_down``, ``ffn_gate_inp`` (router), ``expert_gate``,
    ``expert_up``, ``expert_down``, ``sinks``, ``rope_factors``)."""

    name: str
    shape: tuple[int, ...]
    role: str
    layer: int | None = None
    std: float = 0.02  # scale of the random values
    mean: float = 0.0  # norms are centred on 1


@dataclass
class SynthSpec:
    """Everything but the tokenizer that a synthetic GGUF file of an architecture holds. ``metadata`` maps keys to
    values; ints are written as uint32, floats as float32, unless the value is a ``(value, GGUFValueType)``."""

    metadata: dict[str, Any]
    tensors: list[SynthTensor]
    tokenizer: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokenizer_pre: str | None = None  # e.g. "qwen2"
    vocab_size: int = 0
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)  # role (bos, eos, eot, pad, ...) → token text
    extra_special_tokens: list[str] = field(default_factory=list)  # other control tokens of the family


class Architecture(ABC):
    """Base class for architecture plugins; register an instance through ``register_architectures``."""

    name: ClassVar[str]  # general.architecture
    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    synth_presets: ClassVar[tuple[str, ...]] = ("tiny",)

    @abstractmethod
    def config(self, model: "ModelFile") -> ModelConfig:
        """Read the typed config from the file's metadata (``model.arch_require("block_count")``, ...). Missing
        keys raise ``ModelFileError`` through ``require``."""

    @abstractmethod
    def required_tensors(self, config: ModelConfig) -> list[str]:
        """Names of the tensors ``build`` reads; the loader checks they are all present before building."""

    @abstractmethod
    def build(
        self, model: "ModelFile", config: ModelConfig, device: torch.device, plugins: "OrcdPluginManager"
    ) -> CausalLM:
        """Build the module on ``device``; linear weights stay quantized (``plugins.quantized_tensor``)."""

    def synth_spec(self, preset: str) -> SynthSpec:
        """Describe a synthetic model of this family at a size preset (``tiny`` and the real shapes)."""
        raise NotImplementedError(f"architecture {self.name!r} cannot write synthetic models")
