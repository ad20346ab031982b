"""Building blocks shared by architectures: RMSNorm, rotary embedding (NEOX; frequency factors, linear, YaRN),
grouped-query attention (causal, sliding window, sinks), SwiGLU, quantized embedding, the pre-norm decoder, and
the forward-batch convention between the engine and the models."""

from orcd.nn.attention import FusedQKV, SelfAttention, SeparateQKV, attention
from orcd.nn.batch import ForwardBatch, LayerCache, attention_mask
from orcd.nn.decoder import DecoderBlock, DecoderLM
from orcd.nn.embedding import QuantizedEmbedding
from orcd.nn.mlp import SwiGLU
from orcd.nn.norm import RMSNorm
from orcd.nn.rotary import RopeScaling, RotaryEmbedding, rope_frequencies

__all__ = [
    "DecoderBlock", "DecoderLM", "ForwardBatch", "FusedQKV", "LayerCache", "QuantizedEmbedding", "RMSNorm",
    "RopeScaling", "RotaryEmbedding", "SelfAttention", "SeparateQKV", "SwiGLU", "attention", "attention_mask",
    "rope_frequencies",
]
