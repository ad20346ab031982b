"""orcd.nn building blocks against Hugging Face transformers' own implementations (RMSNorm, NEOX rotary, partial
rotary, YaRN and LongRoPE frequencies, GPT-OSS attention with sinks), plus the mask and cache conventions.

Tolerances: everything here is float32 on small tensors; the references compute the same formulas in a different
order (HF: inv_freq in float32, rotate_half; ours: float64 angles), so 1e-5 absolute covers it with margin (the
observed differences are ~1e-6)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import require_reference
from orcd.engine.kv_cache import KVCache
from orcd.nn import ForwardBatch, RMSNorm, RopeScaling, RotaryEmbedding, attention, attention_mask, rope_frequencies
from orcd.nn.embedding import QuantizedEmbedding
from orcd.quant import QuantizedTensor

ATOL = 1e-5
# HF rotates with float32 angles (position x inv_freq in float32): near position 900 its cos/sin are off by up to
# ~4e-5 (relative float32 error x angle), times |q| up to ~3; measured max 1.3e-4 there, ~1e-7 at positions < 7.
ROPE_ATOL = 3e-4


@pytest.fixture(scope="module")
def transformers():
    return require_reference("transformers")


def test_rms_norm_matches_hf(transformers):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 64) * 3, torch.randn(64)
    ref = Qwen2RMSNorm(64, eps=1e-6)
    ref.weight.data = w.clone()
    assert torch.allclose(RMSNorm(w, 1e-6)(x), ref(x), atol=ATOL)


def _hf_rotary(transformers, rope_parameters: dict, head_dim: int, heads: int = 2, max_pos: int = 4096, **extra):
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    config = transformers.Phi3Config(hidden_size=head_dim * heads, num_attention_heads=heads,
                                     max_position_embeddings=max_pos, rope_parameters=rope_parameters, **extra)
    return Phi3RotaryEmbedding(config)


@pytest.mark.parametrize("rope_dim", [64, 32])  # full and partial rotary (Phi-3 rope.dimension_count < head size)
def test_rotary_matches_hf_neox(transformers, rope_dim):
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    head_dim, base = 64, 10000.0
    hf = _hf_rotary(transformers, {"rope_type": "default", "rope_theta": base,
                                   "partial_rotary_factor": rope_dim / head_dim}, head_dim)
    torch.manual_seed(1)
    q, k = torch.randn(2, 4, 7, head_dim), torch.randn(2, 2, 7, head_dim)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [100, 101, 102, 900, 901, 902, 903]])
    cos_hf, sin_hf = hf(q, positions)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)

    ours = RotaryEmbedding(rope_dim, base)
    cos, sin = ours.cos_sin(positions)
    assert torch.allclose(ours.apply(q, cos, sin), q_ref, atol=ROPE_ATOL)
    assert torch.allclose(ours.apply(k, cos, sin), k_ref, atol=ROPE_ATOL)
    assert torch.allclose(ours.apply(q, cos, sin)[0], q_ref[0], atol=ATOL)  # small positions: tight
    if rope_dim < head_dim:  # the dimensions past the rotary ones pass through untouched
        assert torch.equal(ours.apply(q, cos, sin)[..., rope_dim:], q[..., rope_dim:])


def test_yarn_frequencies_match_hf(transformers):
    """YaRN as ggml's rope_yarn computes it (ramp between the correction dims, mscale 1 + 0.1 ln s) equals HF's."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    dim, base, factor, n_orig = 64, 150000.0, 32.0, 4096
    config = transformers.Qwen2Config(
        hidden_size=dim * 4, num_attention_heads=4, max_position_embeddings=int(n_orig * factor),
        rope_parameters={"rope_type": "yarn", "rope_theta": base, "factor": factor,
                         "original_max_position_embeddings": n_orig, "beta_fast": 32.0, "beta_slow": 1.0})
    inv_freq_hf, mscale_hf = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    inv_freq, mscale = rope_frequencies(dim, base, RopeScaling("yarn", factor, n_orig))
    assert torch.allclose(inv_freq.float(), inv_freq_hf.float(), rtol=1e-6, atol=0)
    assert mscale == pytest.approx(mscale_hf, rel=1e-12)
    # the extremes: the fastest pair keeps its frequency, the slowest is interpolated by the factor
    plain, _ = rope_frequencies(dim, base)
    assert inv_freq[0] == pytest.approx(float(plain[0]))
    assert inv_freq[-1] == pytest.approx(float(plain[-1]) / factor)


def test_longrope_switches_factor_sets_with_the_context(transformers):
    """Phi-3 LongRoPE: short factors up to the original context, long ones past it; the attention factor always."""
    head_dim, n_orig, ctx = 64, 64, 1024
    short = torch.linspace(1.0, 1.5, head_dim // 2)
    long = torch.linspace(1.0, 20.0, head_dim // 2)
    attn_factor = math.sqrt(1 + math.log(ctx / n_orig) / math.log(n_orig))
    hf = _hf_rotary(transformers, {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short.tolist(),
                                   "long_factor": long.tolist(), "original_max_position_embeddings": n_orig},
                    head_dim, max_pos=ctx, original_max_position_embeddings=n_orig)
    ours = RotaryEmbedding(head_dim, 10000.0, RopeScaling(original_context_length=n_orig, attn_factor=attn_factor),
                           freq_factors=short, long_freq_factors=long)
    x = torch.zeros(1, 1, 1, head_dim)
    for n_ctx, seq_len in ((n_orig, n_orig), (ctx, n_orig + 10)):
        # HF picks by the sequence seen, llama.cpp and we by the allocated context; both are "long" past n_orig
        ours.set_context_length(n_ctx)
        positions = torch.arange(seq_len)[None]
        cos_hf, sin_hf = hf(x, positions)
        cos, sin = ours.cos_sin(positions)
        half = head_dim // 2
        assert ours.uses_long_factors == (n_ctx > n_orig)
        assert torch.allclose(cos[0, 0], cos_hf[0, :, :half], atol=ATOL)
        assert torch.allclose(sin[0, 0], sin_hf[0, :, :half], atol=ATOL)


def _hf_sink_attention(transformers, q, k, v, mask, sinks, scale):
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    module = SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], sinks=sinks, training=False)
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    out, _ = eager_attention_forward(module, q, k, v, additive, scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("window", [None, 5])
def test_attention_with_sinks_matches_hf_gpt_oss(transformers, window):
    torch.manual_seed(2)
    b, h_q, h_kv, t, d = 2, 8, 2, 11, 16
    q, k, v = torch.randn(b, h_q, t, d), torch.randn(b, h_kv, t, d), torch.randn(b, h_kv, t, d)
    sinks = torch.randn(h_q)
    positions = torch.arange(t).expand(b, t)
    mask = attention_mask(positions, positions, window)
    ours = attention(q, k, v, mask, 0.25, sinks)
    ref = _hf_sink_attention(transformers, q, k, v, mask, sinks, 0.25)
    assert torch.allclose(ours, ref, atol=ATOL)


def test_attention_without_sinks_equals_sinks_at_minus_infinity():
    """The fast path (SDPA) and the explicit grouped path agree; a sink of -inf takes no weight."""
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 6, 4, 8), torch.randn(1, 3, 9, 8), torch.randn(1, 3, 9, 8)
    mask = attention_mask(torch.tensor([[5, 6, 7, 8]]), torch.arange(9), window=3)
    fast = attention(q, k, v, mask, 0.3)
    explicit = attention(q, k, v, mask, 0.3, sinks=torch.full((6,), float("-inf")))
    assert torch.allclose(fast, explicit, atol=ATOL)


def test_mask_is_causal_and_windowed():
    m = attention_mask(torch.tensor([[2, 3]]), torch.arange(5), window=2)[0, 0]
    assert m.tolist() == [[False, True, True, False, False], [False, False, True, True, False]]
    m = attention_mask(torch.tensor([[2, 3]]), torch.arange(5))[0, 0]
    assert m.tolist() == [[True, True, True, False, False], [True, True, True, True, False]]


def test_kv_cache_batched_update_matches_per_sequence(plugins):
    """A decode step over slots with different lengths writes each token at its own slot and position and reads
    back the same keys as a one-sequence update would."""
    cache = KVCache(n_layers=1, n_slots=3, n_kv_heads=2, head_dim=4, n_ctx=16)
    torch.manual_seed(4)
    k, v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    positions = torch.tensor([[7], [2]])
    batch = ForwardBatch(torch.zeros(2, 1, dtype=torch.long), positions, cache, slots=[2, 0])
    k_all, v_all = cache.update(0, k, v, batch)
    assert k_all.shape == (2, 2, 8, 4)
    assert torch.equal(cache.k[0][2, :, 7], k[0, :, 0]) and torch.equal(cache.v[0][0, :, 2], v[1, :, 0])
    assert torch.equal(k_all[0], cache.k[0][2, :, :8]) and torch.equal(k_all[1], cache.k[0][0, :, :8])
    assert cache.k[0][1].abs().sum() == 0  # the unused slot is untouched


def test_quantized_embedding_decodes_only_the_rows_asked(plugins):
    import gguf
    import numpy as np

    fmt = plugins.quant_format(gguf.GGMLQuantizationType.Q8_0)
    values = np.random.default_rng(5).standard_normal((10, 64)).astype(np.float32)
    qt = QuantizedTensor.from_raw("token_embd.weight", fmt.quantize(values), fmt, (10, 64))
    ids = torch.tensor([[3, 3, 9], [0, 1, 2]])
    rows = QuantizedEmbedding(qt)(ids)
    full = torch.from_numpy(gguf.quants.dequantize(fmt.quantize(values), gguf.GGMLQuantizationType.Q8_0))
    assert torch.equal(rows, full[ids])
