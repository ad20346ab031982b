"""The pre-norm decoder every supported family shares: embed → blocks (x + attn(norm(x)); x + mlp(norm(x))) →
final norm → output head. Architectures supply the pieces; what differs between them stays in their builders."""

from __future__ import annotations

from typing import Callable

import torch

from orcd.arch import CausalLM, ModelConfig
from orcd.nn.batch import ForwardBatch
from orcd.nn.embedding import QuantizedEmbedding
from orcd.quant import QuantizedLinear


class DecoderBlock(torch.nn.Module):
    def __init__(
        self,
        attn_norm: torch.nn.Module,
        attention: torch.nn.Module,
        ffn_norm: torch.nn.Module,
        mlp: Callable[[torch.Tensor], torch.Tensor] | torch.nn.Module,
    ) -> None:
        super().__init__()
        self.attn_norm, self.attention, self.ffn_norm, self.mlp = attn_norm, attention, ffn_norm, mlp

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        delta = self.attention(self.attn_norm(x), batch)
        add_and_norm = getattr(self.ffn_norm, "add_and_norm", None)
        if add_and_norm is not None:  # the residual add and the norm after it as one kernel (RMSNorm)
            h, normed = add_and_norm(x, delta)
        else:
            h = x + delta
            normed = self.ffn_norm(h)
        return h + self.mlp(normed)


class DecoderLM(CausalLM):
    """``forward(batch, all_logits=False)`` → float32 logits ``(B, vocab)`` of each sequence's last token, or
    ``(B, T, vocab)`` for every token with ``all_logits``."""

    def __init__(
        self,
        config: ModelConfig,
        embedding: QuantizedEmbedding,
        blocks: list[DecoderBlock],
        output_norm: torch.nn.Module,
        output: QuantizedLinear,
    ) -> None:
        super().__init__()
        self.config = config
        self.embedding = embedding
        self.blocks = torch.nn.ModuleList(blocks)
        self.output_norm = output_norm
        self.output = output

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def set_context_length(self, n_ctx: int) -> None:
        """Tell position-dependent parts (LongRoPE's factor choice) the context the engine allocated."""
        for module in self.modules():
            if module is not self and hasattr(module, "set_context_length"):
                module.set_context_length(n_ctx)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, all_logits: bool = False) -> torch.Tensor:
        x = self.embedding(batch.tokens)
        for block in self.blocks:
            x = block(x, batch)
        if not all_logits:
            x = x[:, -1:]  # only the last token's logits are needed to sample; skip the head for the rest
        logits = self.output(self.output_norm(x)).float()
        return logits if all_logits else logits[:, -1]
