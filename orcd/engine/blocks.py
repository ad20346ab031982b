"""Bookkeeping of a paged KV cache: which pool blocks each sequence holds, what it was promised, and the prefix
cache. Host-side only (plain Python); the tensors live in ``orcd.engine.kv_cache.PagedKVCache``.

Reservations. A sequence is admitted only if the pool can promise every block it may ever need (prompt plus
``max_tokens``), so it never runs out mid-decode; the blocks themselves are taken as it grows. ``available`` is
what can still be promised: free blocks plus evictable cached ones, minus what is promised but not yet taken.

Prefix cache. A full block's key is a hash chain over token ids: ``key_i = H(key_{i-1} || tokens of block i)``, so
equal keys mean equal tokens at every earlier position, hence equal keys and values in every layer. A block is
registered once all its positions are written; a new sequence whose prompt starts with the same tokens takes the
registered blocks (reference counted) and skips their prefill. Blocks nobody holds stay cached, least recently used
first out, until the pool needs them.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field


def chain_key(parent: bytes, tokens: Seq[int]) -> bytes:
    """The prefix-cache key of a block holding ``tokens`` after the block whose key is ``parent`` (b"" first)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


@dataclass
class _Holding:
    """One sequence's blocks (in position order), the blocks still promised to it, and the keys of its full,
    registered-or-checked blocks (``keys[i]`` belongs to ``blocks[i]``)."""

    blocks: list[int] = field(default_factory=list)
    promised: int = 0
    keys: list[bytes] = field(default_factory=list)


class BlockManager:
    def __init__(self, n_blocks: int, block_size: int, prefix_cache: bool = True) -> None:
        if n_blocks < 1 or block_size < 1:
            raise ValueError(f"a paged KV cache needs at least one block of at least one token, got {n_blocks} "
                             f"blocks of {block_size}")
        self.n_blocks = n_blocks
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        self._free: deque[int] = deque(range(n_blocks))
        self._refs = [0] * n_blocks
        self._key_of: dict[int, bytes] = {}  # cached block -> its key
        self._block_of: dict[bytes, int] = {}  # key -> cached block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, held by nobody; least recently used first
        self._held: dict[int, _Holding] = {}
        self._promised = 0
        self.hit_tokens = 0  # prompt tokens whose keys and values came from the prefix cache
        self.lookup_tokens = 0  # prompt tokens of admitted sequences (the hit rate's denominator)

    # --- capacity ----------------------------------------------------------------------------------------------------
    @property
    def available(self) -> int:
        """Blocks that can still be promised to new sequences."""
        return len(self._free) + len(self._evictable) - self._promised

    @property
    def cached_blocks(self) -> int:
        return len(self._key_of)

    def blocks_for(self, n_positions: int) -> int:
        return -(-n_positions // self.block_size)

    # --- sequences -----------------------------------------------------------------------------------------------------
    def admit(self, seq_id: int, prompt: Seq[int], n_positions: int) -> int | None:
        """Promise ``seq_id`` the blocks for ``n_positions`` positions, reusing cached blocks of its prompt's
        prefix; return how many leading prompt tokens are already in the cache (a multiple of the block size,
        always less than the prompt's length, so the last prompt token is always computed), or ``None`` (nothing
        changed) when the pool cannot promise that much now."""
        if seq_id in self._held:
            raise RuntimeError(f"sequence {seq_id} already holds KV cache blocks")
        hits, keys = self._lookup(prompt)
        # taking a cached block nobody holds removes it from what can be promised
        idle_hits = sum(1 for b in hits if self._refs[b] == 0)
        fresh = self.blocks_for(n_positions) - len(hits)
        if self.available - idle_hits < fresh:
            return None
        for b in hits:
            if self._refs[b] == 0:
                del self._evictable[b]
            self._refs[b] += 1
        self._held[seq_id] = _Holding(blocks=list(hits), promised=fresh, keys=keys)
        self._promised += fresh
        self.hit_tokens += len(hits) * self.block_size
        self.lookup_tokens += len(prompt)
        return len(hits) * self.block_size

    def grow(self, seq_id: int, n_positions: int) -> None:
        """Make sure ``seq_id`` holds blocks for positions ``0 .. n_positions - 1``."""
        held = self._held[seq_id]
        while len(held.blocks) * self.block_size < n_positions:
            if held.promised == 0:
                raise RuntimeError(f"sequence {seq_id} needs {n_positions} positions, more than it was promised")
            held.promised -= 1
            self._promised -= 1
            block = self._take()
            self._refs[block] = 1
            held.blocks.append(block)

    def commit(self, seq_id: int, tokens: Seq[int], n_written: int) -> None:
        """Positions ``0 .. n_written - 1`` of ``seq_id`` (holding ``tokens[:n_written]``) are written: register
        its newly full blocks in the prefix cache."""
        held = self._held[seq_id]
        if not self.prefix_cache:
            return
        bs = self.block_size
        for i in range(len(held.keys), min(n_written // bs, len(held.blocks))):
            key = chain_key(held.keys[-1] if held.keys else b"", tokens[i * bs : (i + 1) * bs])
            held.keys.append(key)
            block = held.blocks[i]
            if key not in self._block_of:  # (another sequence may have computed the same block meanwhile)
                self._block_of[key] = block
                self._key_of[block] = key

    def release(self, seq_id: int) -> None:
        """Give back every block ``seq_id`` holds and what it was promised. Cached blocks stay cached (the last
        block first out), the others are free."""
        held = self._held.pop(seq_id)
        self._promised -= held.promised
        for block in reversed(held.blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def table(self, seq_id: int) -> list[int]:
        return self._held[seq_id].blocks

    def holds(self, seq_id: int) -> bool:
        return seq_id in self._held

    # --- internals -----------------------------------------------------------------------------------------------------
    def _lookup(self, prompt: Seq[int]) -> tuple[list[int], list[bytes]]:
        """Cached blocks of the longest prefix of ``prompt[:-1]`` made of full blocks, and their keys."""
        if not self.prefix_cache:
            return [], []
        bs = self.block_size
        hits: list[int] = []
        keys: list[bytes] = []
        for i in range((len(prompt) - 1) // bs):
            key = chain_key(keys[-1] if keys else b"", prompt[i * bs : (i + 1) * bs])
            block = self._block_of.get(key)
            if block is None:
                break
            hits.append(block)
            keys.append(key)
        return hits, keys

    def _take(self) -> int:
        if self._free:
            return self._free.popleft()
        if not self._evictable:  # the promises make this unreachable
            raise RuntimeError("the KV cache pool has no block left to take")
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._key_of.pop(block)]
        return block
