"""Qwen2 / Qwen2.5 (GGUF architecture ``qwen2``): config from metadata, tensor names, synthetic presets."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from orcd.arch import Architecture, CausalLM, ModelConfig, SynthSpec, SynthTensor

if TYPE_CHECKING:
    from orcd.modelfile import ModelFile
    from orcd.plugins import OrcdPluginManager


class Qwen2Config(ModelConfig):
    tied_embeddings: bool


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
        return Qwen2Config(
            architecture=self.name,
            name=str(model.get("general.name", "")),
            context_length=int(model.arch_require("context_length")),
            embedding_length=hidden,
            block_count=int(model.arch_require("block_count")),
            head_count=heads,
            head_count_kv=int(model.arch_get("attention.head_count_kv", heads)),
            head_dim=hidden // heads,
            vocab_size=_vocab_size(model),
            feed_forward_length=int(model.arch_require("feed_forward_length")),
            rms_norm_eps=float(model.arch_get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_freq_base=float(model.arch_get("rope.freq_base", 10000.0)),
            tied_embeddings="output.weight" not in model.tensors,
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
        raise NotImplementedError("the qwen2 module lands with the first-model issue")

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


def _vocab_size(model: "ModelFile") -> int:
    tokens = model.get("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens)
    return int(model.arch_require("vocab_size"))
