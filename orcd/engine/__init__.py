"""The engine: KV cache, sequences, and the step that advances every active sequence by one token.

The models it drives follow the forward convention of ``orcd.nn.batch``: ``module(ForwardBatch, all_logits=False)``
with per-token positions, one cache slot per sequence, and ``set_context_length(n_ctx)`` before the first forward.
The engine's cache is paged (``PagedKVCache``: blocks, block tables, a prefix cache); ``KVCache`` is the simple
contiguous one, for direct use and as a reference.
"""

from orcd.engine.engine import (
    Engine,
    Event,
    FinishEvent,
    GenerationRequest,
    Sequence,
    TokenEvent,
)
from orcd.engine.kv_cache import KVCache, PagedKVCache

__all__ = ["Engine", "Event", "FinishEvent", "GenerationRequest", "KVCache", "PagedKVCache", "Sequence", "TokenEvent"]
