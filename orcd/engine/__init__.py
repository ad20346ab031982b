"""The engine: KV cache, sequences, and the step that advances every active sequence by one token."""

from orcd.engine.engine import (
    Engine,
    Event,
    FinishEvent,
    GenerationRequest,
    Sequence,
    TokenEvent,
)
from orcd.engine.kv_cache import KVCache

__all__ = ["Engine", "Event", "FinishEvent", "GenerationRequest", "KVCache", "Sequence", "TokenEvent"]
