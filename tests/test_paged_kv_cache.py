"""The paged KV cache: block bookkeeping (promises, growth, release, eviction), the gathered keys and values equal the
contiguous cache's, model logits through either cache agree, and the engine admits by KV blocks (requests wait for
blocks, one that can never fit is refused, blocks are taken as a sequence grows)."""

from __future__ import annotations

import pytest
import torch

from orcd.engine import (
    Engine,
    FinishEvent,
    GenerationRequest,
    KVCache,
    PagedKVCache,
    TokenEvent,
)
from orcd.engine.blocks import BlockManager
from orcd.errors import InvalidRequest
from orcd.loader import load_model
from orcd.nn import ForwardBatch
from orcd.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def qwen(synth_model, plugins):
    return load_model(synth_model("qwen2", "F32"), "cpu", plugins)


def prompt(loaded, seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    special = loaded.tokenizer.special_ids
    ordinary = [i for i in range(loaded.config.vocab_size) if i not in special]
    return [ordinary[i] for i in torch.randint(0, len(ordinary), (length,), generator=g)]


def request(rid: str, ids: list[int], n: int) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt_ids=ids, max_tokens=n, sampling=GREEDY, stop_token_ids=set())


def tokens(events: list) -> list[int]:
    return [e.token_id for e in events if isinstance(e, TokenEvent)]


def run(engine: Engine, *reqs: GenerationRequest) -> tuple[dict[str, list], list[int]]:
    """Step until done: every request's events, and how many sequences each step advanced."""
    for r in reqs:
        engine.add_request(r)
    out: dict[str, list] = {r.request_id: [] for r in reqs}
    widths = []
    while engine.has_work():
        events = engine.step()
        widths.append(sum(isinstance(e, TokenEvent) for e in events))
        for ev in events:
            out[ev.request_id].append(ev)
    return out, widths


# --- the block manager -----------------------------------------------------------------------------------------------


def test_promises_bound_admission_and_blocks_are_taken_as_sequences_grow():
    m = BlockManager(n_blocks=10, block_size=4, prefix_cache=False)
    assert m.admit(1, [1] * 5, n_positions=20) == 0  # 5 blocks promised, none taken yet
    assert m.table(1) == [] and m.available == 5
    assert m.admit(2, [2] * 3, n_positions=24) is None  # 6 blocks: not now, and nothing changed
    assert m.available == 5 and not m.holds(2)
    assert m.admit(2, [2] * 3, n_positions=20) == 0
    assert m.available == 0
    m.grow(1, 5)
    assert len(m.table(1)) == 2 and m.available == 0  # taking promised blocks does not change what is left
    m.grow(1, 20)
    assert len(m.table(1)) == 5
    with pytest.raises(RuntimeError, match="more than it was promised"):
        m.grow(1, 21)
    m.release(1)
    assert m.available == 5
    m.release(2)  # never grew: its promise goes back
    assert m.available == 10
    assert sorted(m._free) == list(range(10))


def test_cached_blocks_are_reused_then_evicted_least_recent_first():
    m = BlockManager(n_blocks=6, block_size=2)
    a = [1, 2, 3, 4, 5, 6, 7]
    assert m.admit(1, a, 7) == 0
    m.grow(1, 7)
    m.commit(1, a, 7)  # 3 full blocks registered (the 4th holds one position)
    assert m.cached_blocks == 3
    first = list(m.table(1))
    m.release(1)
    assert m.available == 6  # cached blocks nobody holds can still be promised
    # the same prefix: its full blocks come back (never the block of the prompt's last token)
    assert m.admit(2, a, 7) == 6 and m.table(2) == first[:3]
    m.release(2)
    assert m.admit(3, [1, 2, 3, 4, 9, 9, 9], 7) == 4  # shares two blocks, then differs
    m.release(3)
    # a sequence needing the whole pool evicts every cached block; the chain's last block goes first
    order = []
    assert m.admit(4, [8] * 3, 12) == 0
    for n in range(2, 13, 2):
        m.grow(4, n)
        order.append(m.table(4)[-1])
    assert m.cached_blocks == 0 and m.available == 0
    assert first == [0, 1, 2, 3]
    assert order == [4, 5, 3, 2, 1, 0]  # free blocks first, then cached ones from the end of the chain
    m.release(4)
    assert m.admit(5, a, 7) == 0  # nothing cached any more


def test_hit_blocks_held_by_nobody_count_against_what_can_be_promised():
    m = BlockManager(n_blocks=4, block_size=2)
    p = [1, 2, 3, 4, 5]
    m.admit(1, p, 5)
    m.grow(1, 5)
    m.commit(1, p, 5)
    m.release(1)  # 2 cached blocks, idle; 4 available
    assert m.admit(2, [7, 7, 7], 6) == 0  # 3 fresh blocks promised: 1 left, and both cached blocks are evictable
    assert m.available == 1
    # 2 hits (taken from the evictable list) + 1 fresh block: 3 > 1 available once the hits are removed
    assert m.admit(3, p, 6) is None
    m.release(2)
    assert m.admit(3, p, 6) == 4


# --- tensors ---------------------------------------------------------------------------------------------------------


def test_paged_update_reads_what_the_contiguous_cache_reads():
    """Three sequences of different lengths in scattered blocks: a prefill chunk and a batched decode write and
    read the same values as the slot cache."""
    torch.manual_seed(0)
    h, d, bs = 2, 8, 4
    paged = PagedKVCache(n_layers=1, n_kv_heads=h, head_dim=d, n_blocks=16, block_size=bs)
    dense = KVCache(n_layers=1, n_slots=3, n_kv_heads=h, head_dim=d, n_ctx=32)
    lengths = [9, 3, 14]
    for s, n in enumerate(lengths):
        paged.blocks.admit(s, [0] * n, 20)
    # interleave the growth so that the blocks of each sequence are not contiguous
    for n in range(1, 15):
        for s, length in enumerate(lengths):
            if n <= length:
                paged.blocks.grow(s, n)
    assert paged.blocks.table(0) != list(range(paged.blocks.table(0)[0], paged.blocks.table(0)[0] + 3))
    for s, n in enumerate(lengths):
        k, v = torch.randn(1, h, n, d), torch.randn(1, h, n, d)
        pos = torch.arange(n)[None]
        got = paged.update(0, k, v, ForwardBatch(torch.zeros(1, n, dtype=torch.long), pos, paged, [s]))
        want = dense.update(0, k, v, ForwardBatch(torch.zeros(1, n, dtype=torch.long), pos, dense, [s]))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for s, n in enumerate(lengths):
        paged.blocks.grow(s, n + 1)
    k, v = torch.randn(3, h, 1, d), torch.randn(3, h, 1, d)
    pos = torch.tensor(lengths)[:, None]
    got = paged.update(0, k, v, ForwardBatch(torch.zeros(3, 1, dtype=torch.long), pos, paged, [0, 1, 2]))
    want = dense.update(0, k, v, ForwardBatch(torch.zeros(3, 1, dtype=torch.long), pos, dense, [0, 1, 2]))
    assert got[0].shape == (3, h, 15, d)
    for s, n in enumerate(lengths):  # positions a sequence has written are equal; the rest is masked anyway
        assert torch.equal(got[0][s, :, : n + 1], want[0][s, :, : n + 1])
        assert torch.equal(got[1][s, :, : n + 1], want[1][s, :, : n + 1])


def test_model_logits_through_paged_and_contiguous_caches_agree(qwen):
    """A prompt prefilled in two chunks, then batched decode next to a second sequence: the same logits as the
    contiguous cache (float32 on the CPU, identical inputs to attention: within 1e-5)."""
    model = qwen.module
    a, b = prompt(qwen, 1, 37), prompt(qwen, 2, 12)
    dense = KVCache.for_model(qwen.config, 2, 64, "cpu")
    paged = PagedKVCache.for_model(qwen.config, 128, "cpu", block_size=8)
    for s, ids in enumerate((a, b)):
        paged.blocks.admit(s, ids, 48)
    pieces = {0: [(0, 20), (20, 37)], 1: [(0, 12)]}
    for s, ids in enumerate((a, b)):
        for start, stop in pieces[s]:
            paged.blocks.grow(s, stop)
            t = torch.tensor([ids[start:stop]])
            p = torch.arange(start, stop)[None]
            want = model(ForwardBatch(t, p, dense, [s], kv_length=stop, starts=[start]))
            got = model(ForwardBatch(t, p, paged, [s], kv_length=stop, starts=[start],
                                     block_tables=paged.block_tables([s])))
            assert (got - want).abs().max().item() < 1e-5
    nxt = [[5], [6]]
    pos = torch.tensor([[37], [12]])
    for s in (0, 1):
        paged.blocks.grow(s, int(pos[s]) + 1)
    want = model(ForwardBatch(torch.tensor(nxt), pos, dense, [0, 1]))
    got = model(ForwardBatch(torch.tensor(nxt), pos, paged, [0, 1]))  # block tables built from the manager
    assert (got - want).abs().max().item() < 1e-5


# --- the engine ------------------------------------------------------------------------------------------------------


def test_requests_wait_for_blocks_and_finish_as_alone(qwen, plugins):
    """A pool of 6 blocks of 16 for three requests promised 3 blocks each: two run at once, the third waits for a
    release, and each produces what it produces alone."""
    prompts = {"a": prompt(qwen, 3, 30), "b": prompt(qwen, 4, 20), "c": prompt(qwen, 5, 25)}
    n = {"a": 10, "b": 20, "c": 12}
    alone = {k: tokens(run(Engine(qwen, plugins, n_ctx=128), request(k, p, n[k]))[0][k]) for k, p in prompts.items()}
    engine = Engine(qwen, plugins, max_batch=3, n_ctx=128, kv_cache_tokens=96, prefix_cache=False)
    assert engine.cache.n_blocks == 6 and engine.blocks_needed(30, 10) == 3
    out, widths = run(engine, *(request(k, p, n[k]) for k, p in prompts.items()))
    assert {k: tokens(v) for k, v in out.items()} == alone
    assert max(widths) == 2  # never three at once: the pool could not promise it
    assert engine.cache.blocks.available == 6


def test_blocks_are_taken_as_the_sequence_grows(qwen, plugins):
    engine = Engine(qwen, plugins, max_batch=1, n_ctx=256, prefix_cache=False)
    engine.add_request(request("g", prompt(qwen, 6, 20), 100))
    engine.step()  # admitted, prefilled, first token: positions 0..19 written
    blocks = engine.cache.blocks
    seq = engine._active[0]
    assert len(blocks.table(seq.seq_id)) == 2  # not the 8 blocks of prompt + max_tokens
    assert blocks.available == engine.cache.n_blocks - 8
    for _ in range(13):
        engine.step()
    assert len(blocks.table(seq.seq_id)) == 3  # 33 positions written


def test_a_request_that_can_never_fit_is_refused(qwen, plugins):
    engine = Engine(qwen, plugins, max_batch=2, n_ctx=128, kv_cache_tokens=64)
    with pytest.raises(InvalidRequest) as e:
        engine.add_request(request("big", prompt(qwen, 7, 40), 60))
    assert e.value.field == "max_tokens" and "KV cache blocks" in e.value.message
    out, _ = run(engine, request("fits", prompt(qwen, 7, 40), 25))
    assert isinstance(out["fits"][-1], FinishEvent) and out["fits"][-1].reason == "max_tokens"


def test_default_pool_holds_max_batch_contexts(qwen, plugins):
    engine = Engine(qwen, plugins, max_batch=3, n_ctx=100)
    per_token = 2 * qwen.config.block_count * qwen.config.head_count_kv * qwen.config.head_dim * 4
    assert engine.cache.n_blocks == 3 * 7 and engine.cache.nbytes == 3 * 112 * per_token
