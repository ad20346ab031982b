"""Token embedding looked up from a quantized table: only the rows of the tokens in the batch are decoded."""

from __future__ import annotations

import torch

from orcd.quant import QuantizedTensor


class QuantizedEmbedding(torch.nn.Module):
    def __init__(self, weight: QuantizedTensor) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"tensor {weight.name!r}: an embedding table must be 2-D, got {weight.shape}")
        self.weight = weight
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows = self.weight.data.index_select(0, ids.reshape(-1))
        values = self.weight.fmt.dequantize(rows.reshape(-1, self.weight.fmt.type_size))
        return values.reshape(*ids.shape, self.embedding_dim).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.weight.fmt.name}"
