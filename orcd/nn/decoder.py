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
        h, delta = self.residual_step(x, None, batch)
        return h + delta

    def residual_step(self, x: torch.Tensor, pending: torch.Tensor | None,
                      batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The block over the residual stream ``x + pending`` (``pending``: the previous block's MLP output, not
        yet added), returning ``(h, mlp_out)`` with the last add left to the next block: every residual add then
        happens inside a norm's kernel (``add_and_norm``), the same sums in the same order as ``forward``."""
        x, normed = _add_norm(self.attn_norm, x, pending)
        h, normed = _add_norm(self.ffn_norm, x, self.attention(normed, batch))
        return h, self.mlp(normed)


def _add_norm(norm: torch.nn.Module, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + delta, norm(x + delta))``; one kernel where the norm has ``add_and_norm`` (RMSNorm)."""
    if delta is None:
        return x, norm(x)
    add_and_norm = getattr(norm, "add_and_norm", None)
    if add_and_norm is not None:
        return add_and_norm(x, delta)
    h = x + delta
    return h, norm(h)


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
        x, pending = self.embedding(batch.tokens), None
        for block in self.blocks:
            x, pending = block.residual_step(x, pending, batch) if isinstance(block, DecoderBlock) else \
                (block(x if pending is None else x + pending, batch), None)
        if not all_logits:
            # only the last token's logits are needed to sample; skip the head for the rest
            x, pending = x[:, -1:], None if pending is None else pending[:, -1:]
        logits = self.output(_add_norm(self.output_norm, x, pending)[1]).float()
        return logits if all_logits else logits[:, -1]
