"""Qwen2 / Qwen2.5 (GGUF architecture ``qwen2``): config from metadata, the module, synthetic presets.

A pre-norm decoder with grouped-query attention whose Q/K/V projections have biases, NEOX rotary with the base from
the metadata (and YaRN when ``rope.scaling.type`` says so), SwiGLU, and an output head that is either its own
tensor or the token embedding (tied, as in Qwen2.5-0.5B). GGUF keeps HF's Q/K row order for NEOX models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from orcd.arch import Architecture, CausalLM, ModelConfig, SynthSpec, SynthTensor
from orcd.errors import ModelFileError
from orcd.nn import DecoderBlock, DecoderLM, QuantizedEmbedding, RotaryEmbedding, SelfAttention
from orcd.nn.fusion import qkv_projection, swiglu
from orcd.quant import QuantizedLinear
from orcd_llama_adapter.common import TensorLoader, rope_scaling, rope_scaling_metadata

if TYPE_CHECKING:
    from orcd.modelfile import ModelFile
    from orcd.plugins import OrcdPluginManager


class Qwen2Config(ModelConfig):
    tied_embeddings: bool
    rope_scaling_type: str = "none"
    rope_scaling_factor: float = 1.0
    rope_original_context_length: int = 0
    rope_attn_factor: float = 1.0


# Real shapes (Qwen2.5-0.5B) and a tiny one for tests: (hidden, layers, heads, kv heads, ffn, vocab, context).
_PRESETS: dict[str, tuple[int, int, int, int, int, int, int]] = {
    "tiny": (256, 2, 4, 2, 384, 512, 2048),
    "qwen2.5-0.5b": (896, 24, 14, 2, 4864, 151936, 32768),
}

QWEN2_CHAT_TEMPLATE_KEY = "qwen2.5"


class Qwen2(Architecture):
    name = "qwen2"
    config_class = Qwen2Config
    synth_presets = tuple(_PRESETS)

    def config(self, model: "ModelFile") -> Qwen2Config:
        hidden = int(model.arch_require("embedding_length"))
        heads = int(model.arch_require("attention.head_count"))
        head_dim = int(model.arch_get("attention.key_length", hidden // heads))
        return Qwen2Config(
            architecture=self.name,
            name=str(model.get("general.name", "")),
            context_length=int(model.arch_require("context_length")),
            embedding_length=hidden,
            block_count=int(model.arch_require("block_count")),
            head_count=heads,
            head_count_kv=int(model.arch_get("attention.head_count_kv", heads)),
            head_dim=head_dim,
            vocab_size=_vocab_size(model),
            feed_forward_length=int(model.arch_require("feed_forward_length")),
            rms_norm_eps=float(model.arch_get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_freq_base=float(model.arch_get("rope.freq_base", 10000.0)),
            tied_embeddings="output.weight" not in model.tensors,
            **rope_scaling_metadata(model),
        )

    def required_tensors(self, config: ModelConfig) -> list[str]:
        names = ["token_embd.weight", "output_norm.weight"]
        for i in range(config.block_count):
            p = f"blk.{i}."
            names += [p + "attn_norm.weight", p + "ffn_norm.weight", p + "attn_output.weight"]
            names += [p + f"attn_{x}.{w}" for x in "qkv" for w in ("weight", "bias")]
            names += [p + f"ffn_{x}.weight" for x in ("gate", "up", "down")]
        return names

    def build(
        self, model: "ModelFile", config: ModelConfig, device: torch.device, plugins: "OrcdPluginManager"
    ) -> CausalLM:
        assert isinstance(config, Qwen2Config)
        t = TensorLoader(model, device, plugins)
        eps = config.rms_norm_eps
        q_size, kv_size = config.head_count * config.head_dim, config.head_count_kv * config.head_dim
        rotary = RotaryEmbedding(config.head_dim, config.rope_freq_base, rope_scaling(config), device=device)
        blocks = []
        for i in range(config.block_count):
            p = f"blk.{i}."
            q, k, v = (t.linear(p + f"attn_{x}.weight", p + f"attn_{x}.bias") for x in "qkv")
            _check_rows(q, q_size)
            _check_rows(k, kv_size)
            _check_rows(v, kv_size)
            attn = SelfAttention(i, qkv_projection(p, q, k, v, device), t.linear(p + "attn_output.weight"), rotary,
                                 config.head_count, config.head_count_kv, config.head_dim)
            mlp = swiglu(p, t.linear(p + "ffn_gate.weight"), t.linear(p + "ffn_up.weight"),
                         t.linear(p + "ffn_down.weight"), device)
            blocks.append(DecoderBlock(t.norm(p + "attn_norm.weight", eps), attn, t.norm(p + "ffn_norm.weight", eps),
                                       mlp))
        embedding = QuantizedEmbedding(t.quantized("token_embd.weight"))
        output = QuantizedLinear(embedding.weight if config.tied_embeddings else t.quantized("output.weight"))
        return DecoderLM(config, embedding, blocks, t.norm("output_norm.weight", eps), output)

    def synth_spec(self, preset: str) -> SynthSpec:
        hidden, layers, heads, kv_heads, ffn, vocab, ctx = _PRESETS[preset]
        head_dim = hidden // heads
        a = self.name
        metadata = {
            "general.name": f"synthetic {preset}",
            f"{a}.context_length": ctx,
            f"{a}.embedding_length": hidden,
            f"{a}.block_count": layers,
            f"{a}.feed_forward_length": ffn,
            f"{a}.attention.head_count": heads,
            f"{a}.attention.head_count_kv": kv_heads,
            f"{a}.rope.freq_base": 1000000.0,
            f"{a}.attention.layer_norm_rms_epsilon": 1e-6,
        }
        tensors = [SynthTensor("token_embd.weight", (vocab, hidden), "token_embd")]
        for i in range(layers):
            p = f"blk.{i}."
            tensors += [
                SynthTensor(p + "attn_norm.weight", (hidden,), "norm", i, std=0.1, mean=1.0),
                SynthTensor(p + "attn_q.weight", (heads * head_dim, hidden), "attn_q", i),
                SynthTensor(p + "attn_q.bias", (heads * head_dim,), "bias", i),
                SynthTensor(p + "attn_k.weight", (kv_heads * head_dim, hidden), "attn_k", i),
                SynthTensor(p + "attn_k.bias", (kv_heads * head_dim,), "bias", i),
                SynthTensor(p + "attn_v.weight", (kv_heads * head_dim, hidden), "attn_v", i),
                SynthTensor(p + "attn_v.bias", (kv_heads * head_dim,), "bias", i),
                SynthTensor(p + "attn_output.weight", (hidden, heads * head_dim), "attn_output", i),
                SynthTensor(p + "ffn_norm.weight", (hidden,), "norm", i, std=0.1, mean=1.0),
                SynthTensor(p + "ffn_gate.weight", (ffn, hidden), "ffn_gate", i),
                SynthTensor(p + "ffn_up.weight", (ffn, hidden), "ffn_up", i),
                SynthTensor(p + "ffn_down.weight", (hidden, ffn), "ffn_down", i),
            ]
        tensors.append(SynthTensor("output_norm.weight", (hidden,), "norm", std=0.1, mean=1.0))
        return SynthSpec(
            metadata=metadata,
            tensors=tensors,
            tokenizer="gpt2",
            tokenizer_pre="qwen2",
            vocab_size=vocab,
            chat_template=QWEN2_CHAT_TEMPLATE_KEY,
            special_tokens={"bos": "<|endoftext|>", "eos": "<|im_end|>", "eot": "<|im_end|>", "pad": "<|endoftext|>"},
            extra_special_tokens=["<|im_start|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
                                  "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"],
        )


def _check_rows(linear: QuantizedLinear, rows: int) -> None:
    if linear.out_features != rows:
        raise ModelFileError(f"tensor {linear.weight.name!r} has {linear.out_features} rows; the metadata's head "
                             f"counts and sizes need {rows}", tensor=linear.weight.name)


def _vocab_size(model: "ModelFile") -> int:
    tokens = model.get("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens)
    return int(model.arch_require("vocab_size"))
