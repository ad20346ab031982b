"""Which ggml type each tensor gets under a GGUF file type, as llama.cpp's quantizer chooses it.

The rules follow llama.cpp's per-tensor choice (its quantizer turns our F32 files into files with exactly these
types: ``tests/test_synth.py``): 1-D tensors stay F32; the output head is Q6_K in Q4_0 and Q4_K_M files; Q4_K_M
gives a share of the ``attn_v``/``attn_qkv``/``ffn_down`` layers Q6_K; 8-expert models get Q8_0 K and V; a row
length that is not a multiple of 256 falls back to a 32-element block type (Qwen2.5-0.5B's 896 does); MXFP4 files
keep the experts MXFP4 and the rest Q8_0.
"""

from __future__ import annotations

from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType

from orcd.arch import SynthTensor

FILE_TYPES: dict[str, LlamaFileType] = {
    "F32": LlamaFileType.ALL_F32,
    "F16": LlamaFileType.MOSTLY_F16,
    "BF16": LlamaFileType.MOSTLY_BF16,
    "Q8_0": LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": LlamaFileType.MOSTLY_Q4_0,
    "Q4_K_M": LlamaFileType.MOSTLY_Q4_K_M,
    "MXFP4": LlamaFileType.MOSTLY_MXFP4_MOE,
}

# llama.cpp's fallback when a row length does not divide into 256-element super-blocks.
_K_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.Q3_K: T.Q4_0, T.Q2_K: T.Q4_0}
_ALWAYS_F32 = {"norm", "bias", "sinks", "rope_factors", "ffn_gate_inp"}
_EXPERT_ROLES = {"expert_gate", "expert_up", "expert_down"}


def _use_more_bits(layer: int, n_layers: int) -> bool:
    """The layers llama.cpp's Q4_K_M gives Q6_K for attn_v / ffn_down: the first and last eighth, every third."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(file_type: str, t: SynthTensor, n_layers: int, tied_output: bool = False, n_expert: int = 0) -> T:
    """The ggml type of tensor ``t`` in a ``file_type`` file of ``n_layers`` blocks (``n_expert`` experts each)."""
    if file_type not in FILE_TYPES:
        raise ValueError(f"unknown file type {file_type!r}; known: {', '.join(FILE_TYPES)}")
    if len(t.shape) == 1 or t.role in _ALWAYS_F32 or file_type == "F32":
        return T.F32
    is_output = t.role == "output" or (t.role == "token_embd" and tied_output)
    if file_type in ("F16", "BF16"):
        chosen = T[file_type]
    elif file_type == "Q8_0":
        chosen = T.Q8_0
    elif file_type == "Q4_0":
        chosen = T.Q6_K if is_output else T.Q4_0
    elif file_type == "MXFP4":
        chosen = T.MXFP4 if t.role in _EXPERT_ROLES else T.Q8_0
    else:  # Q4_K_M
        if is_output:
            chosen = T.Q6_K
        elif t.role in ("attn_v", "attn_qkv", "ffn_down", "expert_down") and t.layer is not None:
            chosen = T.Q6_K if _use_more_bits(t.layer, n_layers) else T.Q4_K
        elif t.role == "attn_output" and n_expert == 8:
            chosen = T.Q5_K
        else:
            chosen = T.Q4_K
    if n_expert == 8 and t.role in ("attn_k", "attn_v") and file_type in ("Q4_0", "Q4_K_M"):
        chosen = T.Q8_0  # llama.cpp spends the few bytes on 8-expert models' K and V
    if chosen in _K_FALLBACK and t.shape[-1] % 256:
        chosen = _K_FALLBACK[chosen]
    return chosen
