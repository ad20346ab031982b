"""Phi-3 / Phi-3.5 (GGUF architecture ``phi3``): config from metadata, the module, synthetic presets.

Differences from Qwen2, all visible in ``build``: Q, K and V come from one fused projection (``attn_qkv``, rows
Q then K then V) and gate and up from one (``ffn_up``, rows gate then up); no biases; the rotary may cover only
``rope.dimension_count`` dimensions of a head; the 128k variants carry per-pair frequency factors
(``rope_factors_long`` / ``rope_factors_short``, chosen by the context length as llama.cpp does) and an attention
factor on cos/sin (``rope.scaling.attn_factor``); the 4k variants declare a sliding window.

The sliding window: HF ``Phi3ForCausalLM`` applies ``sliding_window`` and so do we; llama.cpp currently ignores
it for Phi-3 (its loader disables Phi SWA, llama.cpp PR 13676). The two agree while a sequence is shorter than
the window (2047 for Phi-3-mini-4k).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from orcd.arch import Architecture, CausalLM, ModelConfig, SynthSpec, SynthTensor
from orcd.errors import ModelFileError
from orcd.nn import DecoderBlock, DecoderLM, FusedQKV, QuantizedEmbedding, SelfAttention, SeparateQKV, SwiGLU
from orcd.nn.rotary import RotaryEmbedding
from orcd.quant import QuantizedLinear
from orcd_llama_adapter.common import TensorLoader, rope_scaling, rope_scaling_metadata

if TYPE_CHECKING:
    from orcd.modelfile import ModelFile
    from orcd.plugins import OrcdPluginManager

ROPE_FACTORS_LONG = "rope_factors_long.weight"
ROPE_FACTORS_SHORT = "rope_factors_short.weight"


class Phi3Config(ModelConfig):
    rope_dim: int  # dimensions of each head the rotary covers
    sliding_window: int | None = None
    tied_embeddings: bool = False
    fused_qkv: bool = True
    rope_factors: bool = False  # the file has rope_factors_long/short (LongRoPE, 128k variants)
    rope_scaling_type: str = "none"
    rope_scaling_factor: float = 1.0
    rope_original_context_length: int = 0
    rope_attn_factor: float = 1.0


# (hidden, layers, heads, kv heads, ffn, vocab, context, sliding window, rope dims, LongRoPE original context)
_PRESETS: dict[str, tuple[int, int, int, int, int, int, int, int | None, int | None, int | None]] = {
    # hidden 256 lets Q4_K_M use Q4_K/Q5_K/Q6_K; ffn 384 makes ffn_down fall back to a 32-block type.
    "tiny": (256, 2, 4, 2, 384, 512, 4096, 2047, None, None),
    # Phi-3-mini-128k's features at tiny size: LongRoPE factors and partial rotary. The original context is 256
    # because llama.cpp rounds n_ctx up to a multiple of 256: 256 selects the short factors there, 512 the long.
    "tiny-longrope": (256, 2, 4, 2, 384, 512, 4096, None, 48, 256),
    "phi-3-mini-4k": (3072, 32, 32, 32, 8192, 32064, 4096, 2047, None, None),
}

PHI3_CHAT_TEMPLATE_KEY = "phi-3"
# Phi-3-mini's added tokens (ids 32000-32010 in the real vocabulary), as llama.cpp's converter writes them.
PHI3_ADDED_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
                     "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]


class Phi3(Architecture):
    name = "phi3"
    config_class = Phi3Config
    synth_presets = tuple(_PRESETS)

    def config(self, model: "ModelFile") -> Phi3Config:
        hidden = int(model.arch_require("embedding_length"))
        heads = int(model.arch_require("attention.head_count"))
        head_dim = hidden // heads
        rope_dim = int(model.arch_get("rope.dimension_count", head_dim))
        if rope_dim > head_dim or rope_dim % 2:
            raise ModelFileError(f"{model.path}: phi3.rope.dimension_count is {rope_dim}; it must be even and at "
                                 f"most the head size {head_dim}", key="phi3.rope.dimension_count")
        window = model.arch_get("attention.sliding_window")
        has_long, has_short = ROPE_FACTORS_LONG in model.tensors, ROPE_FACTORS_SHORT in model.tensors
        if has_long != has_short:
            raise ModelFileError(f"{model.path}: the file has only one of {ROPE_FACTORS_LONG!r} and "
                                 f"{ROPE_FACTORS_SHORT!r}; LongRoPE needs both", tensor=ROPE_FACTORS_LONG)
        scaling = rope_scaling_metadata(model)
        context = int(model.arch_require("context_length"))
        if has_long and not scaling["rope_original_context_length"]:
            raise ModelFileError(f"{model.path}: rope factor tensors need phi3.rope.scaling.original_context_length",
                                 key="phi3.rope.scaling.original_context_length")
        return Phi3Config(
            architecture=self.name,
            name=str(model.get("general.name", "")),
            context_length=context,
            embedding_length=hidden,
            block_count=int(model.arch_require("block_count")),
            head_count=heads,
            head_count_kv=int(model.arch_get("attention.head_count_kv", heads)),
            head_dim=head_dim,
            vocab_size=_vocab_size(model),
            feed_forward_length=int(model.arch_require("feed_forward_length")),
            rms_norm_eps=float(model.arch_require("attention.layer_norm_rms_epsilon")),
            rope_freq_base=float(model.arch_get("rope.freq_base", 10000.0)),
            rope_dim=rope_dim,
            sliding_window=int(window) if window else None,
            tied_embeddings="output.weight" not in model.tensors,
            fused_qkv="blk.0.attn_qkv.weight" in model.tensors,
            rope_factors=has_long,
            **scaling,
        )

    def required_tensors(self, config: ModelConfig) -> list[str]:
        assert isinstance(config, Phi3Config)
        names = ["token_embd.weight", "output_norm.weight"]
        if config.rope_factors:
            names += [ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT]
        for i in range(config.block_count):
            p = f"blk.{i}."
            names += [p + "attn_norm.weight", p + "ffn_norm.weight", p + "attn_output.weight"]
            names += [p + "attn_qkv.weight"] if config.fused_qkv else [p + f"attn_{x}.weight" for x in "qkv"]
            names += [p + "ffn_up.weight", p + "ffn_down.weight"]
        return names

    def build(
        self, model: "ModelFile", config: ModelConfig, device: torch.device, plugins: "OrcdPluginManager"
    ) -> CausalLM:
        assert isinstance(config, Phi3Config)
        t = TensorLoader(model, device, plugins)
        eps = config.rms_norm_eps
        q_size, kv_size = config.head_count * config.head_dim, config.head_count_kv * config.head_dim
        short = long = None
        if config.rope_factors:
            short, long = t.dense(ROPE_FACTORS_SHORT), t.dense(ROPE_FACTORS_LONG)
        rotary = RotaryEmbedding(config.rope_dim, config.rope_freq_base, rope_scaling(config), freq_factors=short,
                                 long_freq_factors=long, device=device)
        rotary.set_context_length(config.context_length)
        blocks = []
        for i in range(config.block_count):
            p = f"blk.{i}."
            if config.fused_qkv:
                qkv: FusedQKV | SeparateQKV = FusedQKV(t.linear(p + "attn_qkv.weight"), q_size, kv_size)
            else:
                qkv = SeparateQKV(*(t.linear(p + f"attn_{x}.weight") for x in "qkv"))
            attn = SelfAttention(i, qkv, t.linear(p + "attn_output.weight"), rotary, config.head_count,
                                 config.head_count_kv, config.head_dim, sliding_window=config.sliding_window)
            up = t.linear(p + "ffn_up.weight")
            if up.out_features != 2 * config.feed_forward_length:
                raise ModelFileError(f"tensor {p}ffn_up.weight has {up.out_features} rows; a fused gate|up of "
                                     f"feed_forward_length {config.feed_forward_length} needs "
                                     f"{2 * config.feed_forward_length}", tensor=p + "ffn_up.weight")
            mlp = SwiGLU(None, up, t.linear(p + "ffn_down.weight"))
            blocks.append(DecoderBlock(t.norm(p + "attn_norm.weight", eps), attn, t.norm(p + "ffn_norm.weight", eps),
                                       mlp))
        embedding = QuantizedEmbedding(t.quantized("token_embd.weight"))
        output = QuantizedLinear(embedding.weight if config.tied_embeddings else t.quantized("output.weight"))
        return DecoderLM(config, embedding, blocks, t.norm("output_norm.weight", eps), output)

    def synth_spec(self, preset: str) -> SynthSpec:
        hidden, layers, heads, kv_heads, ffn, vocab, ctx, window, rope_dim, orig_ctx = _PRESETS[preset]
        head_dim = hidden // heads
        a = self.name
        metadata: dict = {
            "general.name": f"synthetic {preset}",
            f"{a}.context_length": ctx,
            f"{a}.embedding_length": hidden,
            f"{a}.block_count": layers,
            f"{a}.feed_forward_length": ffn,
            f"{a}.attention.head_count": heads,
            f"{a}.attention.head_count_kv": kv_heads,
            f"{a}.rope.dimension_count": rope_dim or head_dim,
            f"{a}.rope.freq_base": 10000.0,
            f"{a}.attention.layer_norm_rms_epsilon": 1e-5,
            "tokenizer.ggml.add_bos_token": True,  # Phi-3's tokenizer_config: add_bos_token true, add_eos false
            "tokenizer.ggml.add_eos_token": False,
        }
        if window:
            metadata[f"{a}.attention.sliding_window"] = window
        tensors = [SynthTensor("token_embd.weight", (vocab, hidden), "token_embd")]
        metadata[f"{a}.rope.scaling.original_context_length"] = orig_ctx or ctx
        if orig_ctx:
            # As llama.cpp's converter writes Phi-3-128k: the LongRoPE attention factor from the context ratio.
            scale = ctx / orig_ctx
            metadata[f"{a}.rope.scaling.attn_factor"] = math.sqrt(1 + math.log(scale) / math.log(orig_ctx))
            pairs = (rope_dim or head_dim) // 2
            tensors += [SynthTensor(ROPE_FACTORS_LONG, (pairs,), "rope_factors", std=0.5, mean=4.0),
                        SynthTensor(ROPE_FACTORS_SHORT, (pairs,), "rope_factors", std=0.05, mean=1.0)]
        for i in range(layers):
            p = f"blk.{i}."
            tensors += [
                SynthTensor(p + "attn_norm.weight", (hidden,), "norm", i, std=0.1, mean=1.0),
                SynthTensor(p + "attn_qkv.weight", ((heads + 2 * kv_heads) * head_dim, hidden), "attn_qkv", i),
                SynthTensor(p + "attn_output.weight", (hidden, heads * head_dim), "attn_output", i),
                SynthTensor(p + "ffn_norm.weight", (hidden,), "norm", i, std=0.1, mean=1.0),
                SynthTensor(p + "ffn_up.weight", (2 * ffn, hidden), "ffn_up", i),
                SynthTensor(p + "ffn_down.weight", (hidden, ffn), "ffn_down", i),
            ]
        tensors += [SynthTensor("output_norm.weight", (hidden,), "norm", std=0.1, mean=1.0),
                    SynthTensor("output.weight", (vocab, hidden), "output")]
        return SynthSpec(
            metadata=metadata,
            tensors=tensors,
            tokenizer="llama",
            tokenizer_pre="default",
            vocab_size=vocab,
            chat_template=PHI3_CHAT_TEMPLATE_KEY,
            special_tokens={"bos": "<s>", "eos": "<|endoftext|>", "eot": "<|end|>", "unk": "<unk>",
                            "pad": "<|endoftext|>"},
            extra_special_tokens=[tok for tok in PHI3_ADDED_TOKENS if tok not in ("<|endoftext|>", "<|end|>")],
        )


def _vocab_size(model: "ModelFile") -> int:
    tokens = model.get("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens)
    return int(model.arch_require("vocab_size"))
