"""GPT-OSS (GGUF architecture ``gpt-oss``, llama.cpp's ``LLM_ARCH_OPENAI_MOE``): config, module, synthetic presets.

A pre-norm decoder (``attn_norm`` before attention, ``post_attention_norm`` before the feed-forward) whose attention
has Q/K/V and output biases, NEOX rotary with YaRN scaling, and a learned per-head sink logit in every softmax.
Layers alternate sliding-window and full attention: with period ``p`` (``attention.sliding_window_pattern``,
default 2) layer ``i`` uses the window when ``i % p < p - 1`` (llama.cpp's ``set_swa_pattern``; HF's
``layer_types`` start with ``sliding_attention`` too). The feed-forward is a mixture of experts (``moe.py``); the
output head is its own tensor. Tensor names and metadata keys are the ones llama.cpp's converter writes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from orcd.arch import Architecture, CausalLM, ModelConfig, SynthSpec, SynthTensor
from orcd.errors import ModelFileError
from orcd.nn import DecoderBlock, DecoderLM, QuantizedEmbedding, RMSNorm, RopeScaling, RotaryEmbedding, SelfAttention
from orcd.nn.fusion import qkv_projection, stacks_on
from orcd.quant import QuantizedLinear
from orcd_gpt_adapter.moe import SWIGLU_ALPHA, SWIGLU_LIMIT, ExpertProjection, MixtureOfExperts, stack_gate_up
from orcd_gpt_adapter.yarn import yarn_rotary

if TYPE_CHECKING:
    from orcd.modelfile import ModelFile
    from orcd.plugins import OrcdPluginManager

ARCH = "gpt-oss"
CHAT_TEMPLATE_KEY = "gpt-oss"  # the harmony template in orcd.testing's template table


class GptOssConfig(ModelConfig):
    expert_count: int
    expert_used_count: int
    expert_feed_forward_length: int
    sliding_window: int
    sliding_window_pattern: int = 2  # every p-th layer (the last of each period) attends to the full context
    rope_freq_base_swa: float
    rope_scaling_type: str = "none"  # "none" or "yarn"
    rope_scaling_factor: float = 1.0
    rope_original_context_length: int = 0
    rope_attn_factor: float = 1.0
    rope_yarn_beta_fast: float = 32.0
    rope_yarn_beta_slow: float = 1.0
    # llama.cpp rounds YaRN's correction range to whole pairs; OpenAI's reference and HF do not. The GGUF does not
    # say which; the default follows the model's own reference (see yarn.py).
    rope_yarn_truncate: bool = False
    swiglu_alpha: float = SWIGLU_ALPHA
    swiglu_limit: float = SWIGLU_LIMIT

    def is_sliding(self, layer: int) -> bool:
        p = self.sliding_window_pattern
        return p == 0 or layer % p < p - 1

    def kv_read_bytes(self, n_ctx: int, bytes_per_element: int = 2) -> int:
        """A sliding-window layer's decode step reads only the window's keys and values (``decode_attention``)."""
        per_layer_token = 2 * self.head_count_kv * self.head_dim * bytes_per_element
        read = sum(min(n_ctx, self.sliding_window) if self.is_sliding(i) else n_ctx for i in range(self.block_count))
        return per_layer_token * read

    def rope_scaling(self) -> RopeScaling:
        if self.rope_scaling_type != "yarn":
            return RopeScaling()
        return RopeScaling(kind="yarn", factor=self.rope_scaling_factor,
                           original_context_length=self.rope_original_context_length,
                           attn_factor=self.rope_attn_factor, beta_fast=self.rope_yarn_beta_fast,
                           beta_slow=self.rope_yarn_beta_slow)


# (hidden, layers, q heads, kv heads, head dim, experts, used, expert ffn, vocab, context)
_PRESETS: dict[str, tuple[int, ...]] = {
    "tiny": (256, 4, 4, 2, 64, 8, 4, 128, 1024, 4096),
    "gpt-oss-20b": (2880, 24, 64, 8, 64, 32, 4, 2880, 201088, 131072),
}


class GptOss(Architecture):
    name = ARCH
    config_class = GptOssConfig
    synth_presets = tuple(_PRESETS)

    def config(self, model: "ModelFile") -> GptOssConfig:
        hidden = int(model.arch_require("embedding_length"))
        heads = int(model.arch_require("attention.head_count"))
        expert_ffn = int(model.arch_require("expert_feed_forward_length"))
        base = float(model.arch_get("rope.freq_base", 10000.0))
        return GptOssConfig(
            architecture=self.name,
            name=str(model.get("general.name", "")),
            context_length=int(model.arch_require("context_length")),
            embedding_length=hidden,
            block_count=int(model.arch_require("block_count")),
            head_count=heads,
            head_count_kv=int(model.arch_get("attention.head_count_kv", heads)),
            # GPT-OSS heads are 64 wide although 2880 / 64 is 45: the head size is its own key.
            head_dim=int(model.arch_get("attention.key_length", hidden // heads)),
            vocab_size=_vocab_size(model),
            feed_forward_length=int(model.arch_get("feed_forward_length", expert_ffn)),
            rms_norm_eps=float(model.arch_get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_freq_base=base,
            expert_count=int(model.arch_require("expert_count")),
            expert_used_count=int(model.arch_require("expert_used_count")),
            expert_feed_forward_length=expert_ffn,
            sliding_window=int(model.arch_require("attention.sliding_window")),
            sliding_window_pattern=_swa_pattern(model),
            rope_freq_base_swa=float(model.arch_get("rope.freq_base_swa", base)),
            **_rope_scaling_metadata(model),
        )

    def required_tensors(self, config: ModelConfig) -> list[str]:
        names = ["token_embd.weight", "output_norm.weight", "output.weight"]
        for i in range(config.block_count):
            p = f"blk.{i}."
            names += [p + "attn_norm.weight", p + "post_attention_norm.weight", p + "attn_sinks.weight"]
            names += [p + f"attn_{x}.{w}" for x in ("q", "k", "v", "output") for w in ("weight", "bias")]
            names += [p + f"ffn_gate_inp.{w}" for w in ("weight", "bias")]
            names += [p + f"ffn_{x}_exps.{w}" for x in ("gate", "up", "down") for w in ("weight", "bias")]
        return names

    def build(
        self, model: "ModelFile", config: ModelConfig, device: torch.device, plugins: "OrcdPluginManager"
    ) -> CausalLM:
        if not isinstance(config, GptOssConfig):
            raise TypeError(f"gpt-oss builds from a GptOssConfig, got {type(config).__name__}")
        t = _Tensors(model, device, plugins)
        eps = config.rms_norm_eps
        scaling = config.rope_scaling()
        truncate = config.rope_yarn_truncate

        def rotary(base: float) -> RotaryEmbedding:
            if scaling.kind == "yarn":
                return yarn_rotary(config.head_dim, base, scaling, truncate, device)
            return RotaryEmbedding(config.head_dim, base, device=device)

        rotary_full = rotary(config.rope_freq_base)
        rotary_swa = rotary_full if config.rope_freq_base_swa == config.rope_freq_base else \
            rotary(config.rope_freq_base_swa)
        q_size, kv_size = config.head_count * config.head_dim, config.head_count_kv * config.head_dim
        blocks = []
        for i in range(config.block_count):
            p = f"blk.{i}."
            q, k, v = (t.linear(p + f"attn_{x}.weight", p + f"attn_{x}.bias") for x in "qkv")
            for proj, rows in ((q, q_size), (k, kv_size), (v, kv_size)):
                _check_shape(proj.weight.name, proj.weight.shape, (rows, config.embedding_length))
            qkv = qkv_projection(p, q, k, v, device)
            sinks = t.dense(p + "attn_sinks.weight")
            _check_shape(p + "attn_sinks.weight", tuple(sinks.shape), (config.head_count,))
            sliding = config.is_sliding(i)
            attn = SelfAttention(
                i, qkv, t.linear(p + "attn_output.weight", p + "attn_output.bias"),
                rotary_swa if sliding else rotary_full, config.head_count, config.head_count_kv, config.head_dim,
                sliding_window=config.sliding_window if sliding else None, sinks=sinks,
            )
            blocks.append(DecoderBlock(t.norm(p + "attn_norm.weight", eps), attn,
                                       t.norm(p + "post_attention_norm.weight", eps), self._moe(t, p, config)))
        embedding = QuantizedEmbedding(t.quantized("token_embd.weight"))
        output = QuantizedLinear(t.quantized("output.weight"))
        return DecoderLM(config, embedding, blocks, t.norm("output_norm.weight", eps), output)

    def _moe(self, t: "_Tensors", p: str, config: GptOssConfig) -> MixtureOfExperts:
        n_expert, hidden, ffn = config.expert_count, config.embedding_length, config.expert_feed_forward_length
        router = t.dense(p + "ffn_gate_inp.weight")
        _check_shape(p + "ffn_gate_inp.weight", tuple(router.shape), (n_expert, hidden))
        experts = {}
        for x, shape in (("gate", (n_expert, ffn, hidden)), ("up", (n_expert, ffn, hidden)),
                         ("down", (n_expert, hidden, ffn))):
            weight = t.quantized(p + f"ffn_{x}_exps.weight")
            _check_shape(weight.name, weight.shape, shape)
            experts[x] = ExpertProjection(weight, t.dense(p + f"ffn_{x}_exps.bias"))
        gate, up = experts.pop("gate"), experts.pop("up")
        stacked = stack_gate_up(p + "ffn_gate_up_exps(stacked)", gate, up) if stacks_on(t.device) else None
        if stacked is not None:  # one expert launch for both on CUDA, as fusion.swiglu does for a dense MLP
            gate, up = None, stacked
        return MixtureOfExperts(router, t.dense(p + "ffn_gate_inp.bias"), gate, up,
                                experts["down"], config.expert_used_count, config.swiglu_alpha,
                                config.swiglu_limit)

    def synth_spec(self, preset: str) -> SynthSpec:
        hidden, layers, heads, kv_heads, head_dim, n_expert, n_used, ffn, vocab, ctx = _PRESETS[preset]
        a = self.name
        metadata = {
            "general.name": f"synthetic {preset}",
            f"{a}.context_length": ctx,
            f"{a}.embedding_length": hidden,
            f"{a}.block_count": layers,
            f"{a}.feed_forward_length": ffn,
            f"{a}.attention.head_count": heads,
            f"{a}.attention.head_count_kv": kv_heads,
            f"{a}.attention.key_length": head_dim,
            f"{a}.attention.value_length": head_dim,
            f"{a}.attention.layer_norm_rms_epsilon": 1e-5,
            f"{a}.attention.sliding_window": 128,
            f"{a}.rope.freq_base": 150000.0,
            f"{a}.rope.scaling.type": "yarn",
            f"{a}.rope.scaling.factor": 32.0,
            f"{a}.rope.scaling.original_context_length": 4096,
            f"{a}.expert_count": n_expert,
            f"{a}.expert_used_count": n_used,
            f"{a}.expert_feed_forward_length": ffn,
        }
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        # Scales chosen so a tiny model is well conditioned: llama.cpp's CPU path rounds activations to 8 bits before
        # every Q8_0/MXFP4 product, and larger gains would turn that rounding into different routing and argmaxes.
        tensors = [SynthTensor("token_embd.weight", (vocab, hidden), "token_embd", std=0.5)]
        for i in range(layers):
            p = f"blk.{i}."
            tensors += [
                SynthTensor(p + "attn_norm.weight", (hidden,), "norm", i, std=0.1, mean=1.0),
                SynthTensor(p + "attn_q.weight", (q_size, hidden), "attn_q", i, std=0.03),
                SynthTensor(p + "attn_q.bias", (q_size,), "bias", i, std=0.1),
                SynthTensor(p + "attn_k.weight", (kv_size, hidden), "attn_k", i, std=0.03),
                SynthTensor(p + "attn_k.bias", (kv_size,), "bias", i, std=0.1),
                SynthTensor(p + "attn_v.weight", (kv_size, hidden), "attn_v", i, std=0.06),
                SynthTensor(p + "attn_v.bias", (kv_size,), "bias", i, std=0.1),
                SynthTensor(p + "attn_output.weight", (hidden, q_size), "attn_output", i, std=0.06),
                SynthTensor(p + "attn_output.bias", (hidden,), "bias", i, std=0.1),
                SynthTensor(p + "attn_sinks.weight", (heads,), "sinks", i, std=1.0),
                SynthTensor(p + "post_attention_norm.weight", (hidden,), "norm", i, std=0.1, mean=1.0),
                SynthTensor(p + "ffn_gate_inp.weight", (n_expert, hidden), "ffn_gate_inp", i, std=0.02),
                SynthTensor(p + "ffn_gate_inp.bias", (n_expert,), "bias", i, std=0.5),
                SynthTensor(p + "ffn_gate_exps.weight", (n_expert, ffn, hidden), "expert_gate", i, std=0.05),
                SynthTensor(p + "ffn_gate_exps.bias", (n_expert, ffn), "bias", i, std=0.5),
                SynthTensor(p + "ffn_up_exps.weight", (n_expert, ffn, hidden), "expert_up", i, std=0.05),
                SynthTensor(p + "ffn_up_exps.bias", (n_expert, ffn), "bias", i, std=0.5),
                SynthTensor(p + "ffn_down_exps.weight", (n_expert, hidden, ffn), "expert_down", i, std=0.01),
                SynthTensor(p + "ffn_down_exps.bias", (n_expert, hidden), "bias", i, std=0.1),
            ]
        tensors += [
            SynthTensor("output_norm.weight", (hidden,), "norm", std=0.1, mean=1.0),
            SynthTensor("output.weight", (vocab, hidden), "output", std=0.3),
        ]
        from orcd.testing.vocab import HARMONY_SPECIAL_TOKENS, harmony_added_tokens

        return SynthSpec(
            metadata=metadata,
            tensors=tensors,
            tokenizer="gpt2",
            tokenizer_pre="gpt-4o",
            vocab_size=vocab,
            chat_template=CHAT_TEMPLATE_KEY,
            special_tokens=dict(HARMONY_SPECIAL_TOKENS),
            # o200k_harmony's added tokens in id order: all 1,090 at their real ids for the real shape, the first 21
            # (every named one: <|start|>, <|channel|>, <|message|>, <|end|>, <|return|>, <|call|>, ...) when tiny.
            extra_special_tokens=harmony_added_tokens(full=vocab == 201088),
        )


class _Tensors:
    """Reads one file's tensors onto a device: linear weights stay quantized, norms, biases, sinks and the router
    become float32."""

    def __init__(self, model: "ModelFile", device: torch.device, plugins: "OrcdPluginManager") -> None:
        self.model, self.device, self.plugins = model, device, plugins

    def quantized(self, name: str):
        return self.plugins.quantized_tensor(self.model, name, self.device)

    def dense(self, name: str) -> torch.Tensor:
        return self.plugins.dense_tensor(self.model, name, self.device)

    def linear(self, name: str, bias: str | None = None) -> QuantizedLinear:
        return QuantizedLinear(self.quantized(name), self.dense(bias) if bias else None)

    def norm(self, name: str, eps: float) -> RMSNorm:
        return RMSNorm(self.dense(name), eps)


def _check_shape(name: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(shape) != tuple(expected):
        raise ModelFileError(f"tensor {name!r} has shape {tuple(shape)}; the metadata's sizes need {expected}",
                             tensor=name)


def _swa_pattern(model: "ModelFile") -> int:
    key = f"{model.architecture}.attention.sliding_window_pattern"
    value = model.get(key, 2)
    if not isinstance(value, int) or value < 0:
        raise ModelFileError(f"{model.path}: {key} is {value!r}; gpt-oss needs a period (a non-negative integer)",
                             key=key)
    return value


def _rope_scaling_metadata(model: "ModelFile") -> dict[str, float | int | str]:
    a = model.architecture
    kind = str(model.arch_get("rope.scaling.type", "none")).lower() or "none"
    if kind not in ("none", "yarn"):
        raise ModelFileError(f"{model.path}: {a}.rope.scaling.type is {kind!r}; gpt-oss supports none and yarn",
                             key=f"{a}.rope.scaling.type")
    fields: dict[str, float | int | str] = {"rope_scaling_type": kind}
    if kind == "yarn":
        fields.update(
            rope_scaling_factor=float(model.arch_require("rope.scaling.factor")),
            rope_original_context_length=int(model.arch_require("rope.scaling.original_context_length")),
            rope_attn_factor=float(model.arch_get("rope.scaling.attn_factor", 1.0)),
            rope_yarn_beta_fast=float(model.arch_get("rope.scaling.yarn_beta_fast", 32.0)),
            rope_yarn_beta_slow=float(model.arch_get("rope.scaling.yarn_beta_slow", 1.0)),
        )
    return fields


def _vocab_size(model: "ModelFile") -> int:
    tokens = model.get("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens)
    return int(model.arch_require("vocab_size"))
