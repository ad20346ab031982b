"""Helpers of the Qwen2 / Phi-3 reference tests: the same weights in Hugging Face transformers, our forward and
greedy decode, and the test prompts.

The HF model gets the GGUF tensors dequantized by gguf's own numpy code (not ours), mapped to HF names without any
un-permuting: llama.cpp's converter keeps HF's Q/K row order for NEOX-rotary models (qwen2, phi3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from orcd.engine.kv_cache import KVCache
from orcd.loader import LoadedModel, load_model
from orcd.nn import ForwardBatch

# The test text: prose, code, digits, whitespace runs and a special token; >= 64 tokens in both tiny vocabularies.
PROMPT_TEXT = (
    "The quick brown fox jumps over the lazy dog, again and again, until 1234 foxes are tired.\n"
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
    "Numbers: 3.14159, 2.71828 and 1,000,000 —   spaces   and\ttabs."
)


def gguf_float_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the file as float32, decoded by gguf's numpy dequantizers."""
    reader = gguf.GGUFReader(path)
    return {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
            for t in reader.tensors}


def hf_model(transformers: Any, path: str | Path, config: Any, sliding_window: int | None = None) -> torch.nn.Module:
    """``Qwen2ForCausalLM`` / ``Phi3ForCausalLM`` with the file's weights, float32, eager attention."""
    w = gguf_float_weights(path)
    common = dict(
        vocab_size=config.vocab_size, hidden_size=config.embedding_length,
        intermediate_size=config.feed_forward_length, num_hidden_layers=config.block_count,
        num_attention_heads=config.head_count, num_key_value_heads=config.head_count_kv,
        rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=config.tied_embeddings,
        attn_implementation="eager", pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    sd = {"model.embed_tokens.weight": w["token_embd.weight"], "model.norm.weight": w["output_norm.weight"],
          "lm_head.weight": w.get("output.weight", w["token_embd.weight"])}
    if config.architecture == "qwen2":
        hc = transformers.Qwen2Config(max_position_embeddings=config.context_length,
                                      rope_parameters={"rope_type": "default", "rope_theta": config.rope_freq_base},
                                      **common)
        model = transformers.Qwen2ForCausalLM(hc)
        for i in range(config.block_count):
            p, q = f"blk.{i}.", f"model.layers.{i}."
            for x in "qkv":
                sd[q + f"self_attn.{x}_proj.weight"] = w[p + f"attn_{x}.weight"]
                sd[q + f"self_attn.{x}_proj.bias"] = w[p + f"attn_{x}.bias"]
            for x in ("gate", "up", "down"):
                sd[q + f"mlp.{x}_proj.weight"] = w[p + f"ffn_{x}.weight"]
    else:
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_freq_base,
                                "partial_rotary_factor": config.rope_dim / config.head_dim}
        original = config.rope_original_context_length or config.context_length
        if config.rope_factors:
            rope.update(rope_type="longrope", long_factor=w["rope_factors_long.weight"].tolist(),
                        short_factor=w["rope_factors_short.weight"].tolist(),
                        original_max_position_embeddings=original)
        hc = transformers.Phi3Config(max_position_embeddings=config.context_length,
                                     original_max_position_embeddings=original, rope_parameters=rope,
                                     sliding_window=sliding_window, **common)
        model = transformers.Phi3ForCausalLM(hc)
        for i in range(config.block_count):
            p, q = f"blk.{i}.", f"model.layers.{i}."
            sd[q + "self_attn.qkv_proj.weight"] = w[p + "attn_qkv.weight"]
            sd[q + "mlp.gate_up_proj.weight"] = w[p + "ffn_up.weight"]
            sd[q + "mlp.down_proj.weight"] = w[p + "ffn_down.weight"]
    for i in range(config.block_count):
        p, q = f"blk.{i}.", f"model.layers.{i}."
        sd[q + "input_layernorm.weight"] = w[p + "attn_norm.weight"]
        sd[q + "post_attention_layernorm.weight"] = w[p + "ffn_norm.weight"]
        sd[q + "self_attn.o_proj.weight"] = w[p + "attn_output.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing  # tied heads are not a separate parameter
    return model.eval()


def hf_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def load(path: str | Path, plugins: Any, device: str = "cpu") -> LoadedModel:
    return load_model(path, device, plugins)


def prompt_logits(loaded: LoadedModel, ids: list[int], n_ctx: int) -> torch.Tensor:
    """Logits of every prompt position (on the CPU), through the KV cache as the engine runs a prefill, on the
    model's device."""
    loaded.module.set_context_length(n_ctx)
    cache = KVCache.for_model(loaded.config, 1, n_ctx, loaded.device)
    return loaded.module(one_sequence(cache, ids, 0), all_logits=True)[0].cpu()


def one_sequence(cache: KVCache, ids: list[int], start: int) -> ForwardBatch:
    """Tokens ``ids`` at positions ``start ..`` of the cache's sequence 0, on the cache's device."""
    device = cache.device
    positions = torch.arange(start, start + len(ids), device=device)[None]
    return ForwardBatch(torch.tensor([ids], device=device), positions, cache, [0])


def greedy(loaded: LoadedModel, prompt: list[int], n: int, n_ctx: int) -> tuple[list[int], list[float]]:
    """``n`` greedy tokens through the cache (prefill, then one token per forward), and the top-2 margin of each."""
    loaded.module.set_context_length(n_ctx)
    cache = KVCache.for_model(loaded.config, 1, n_ctx, loaded.device)
    ids = list(prompt)
    logits = loaded.module(one_sequence(cache, ids, 0))[0].cpu()
    margins = []
    for _ in range(n):
        top = torch.topk(logits, 2).values
        margins.append(float(top[0] - top[1]))
        ids.append(int(torch.argmax(logits)))
        logits = loaded.module(one_sequence(cache, ids[-1:], len(ids) - 1))[0].cpu()
    return ids[len(prompt):], margins


def random_prompt(loaded: LoadedModel, seed: int, length: int = 64) -> list[int]:
    """``length`` random ordinary (non-special) token ids."""
    special = loaded.tokenizer.special_ids
    ordinary = torch.tensor([i for i in range(loaded.config.vocab_size) if i not in special])
    g = torch.Generator().manual_seed(seed)
    return ordinary[torch.randint(0, len(ordinary), (length,), generator=g)].tolist()


def dequantized_copy(loaded: LoadedModel, plugins: Any) -> torch.nn.Module:
    """The module with every quantized weight decoded once to F32 storage: the same numbers (the decoders are
    bit-exact with gguf's), an order of magnitude faster on CPU. Used only to choose well-conditioned prompts."""
    import copy

    from orcd.quant import QuantizedTensor

    f32 = plugins.quant_format(gguf.GGMLQuantizationType.F32)
    module = copy.deepcopy(loaded.module)
    decoded: dict[int, QuantizedTensor] = {}
    for sub in module.modules():
        qt = getattr(sub, "weight", None)
        if isinstance(qt, QuantizedTensor):  # linear layers and the embedding
            if id(qt) not in decoded:  # a tied head shares the embedding's tensor
                values = qt.dequantize().reshape(qt.n_rows, -1).contiguous()
                decoded[id(qt)] = QuantizedTensor(qt.name, values.view(torch.uint8), f32, qt.shape)
            setattr(sub, "weight", decoded[id(qt)])
    return module


def well_conditioned_prompt(loaded: LoadedModel, plugins: Any, margin: float, n: int = 32, n_ctx: int = 256,
                            candidates: int = 30) -> tuple[list[int], list[int], float]:
    """Among ``candidates`` random 64-token prompts, the one whose greedy continuation (by our model) never has a
    top-2 logit gap below ``margin`` and has the most distinct tokens. Near-ties are decided by rounding noise,
    which two correct implementations do not share; the prompt is chosen without looking at the reference.
    Returns (prompt, our greedy tokens, the smallest gap)."""
    fast = LoadedModel(loaded.path, loaded.model_file, loaded.config, dequantized_copy(loaded, plugins),
                       loaded.tokenizer, loaded.chat_template, loaded.device, 0.0)
    best: tuple[int, int, list[int], list[int], float] | None = None
    for seed in range(candidates):
        prompt = random_prompt(loaded, seed)
        tokens, margins = greedy(fast, prompt, n, n_ctx)
        if min(margins) >= margin and (best is None or len(set(tokens)) > best[0]):
            best = (len(set(tokens)), seed, prompt, tokens, min(margins))
    assert best is not None, f"no prompt among {candidates} keeps every greedy top-2 gap above {margin}"
    return best[2], best[3], best[4]
