"""The engine's overlapped step (``Engine(overlap=True)``, the default on CUDA): the device runs step n + 1 from step
n's device tokens while the host reads step n. On the CPU the forward is synchronous, so these tests check the
bookkeeping, not the overlap: the same tokens, texts, finish reasons and freed blocks as the plain step, for batches
that change (sequences ending by max_tokens, by a stop token mid-run, cancelled, joining), eagerly and at the fixed
shapes of the CUDA-graph path. One GPU test checks the overlap itself: reading a step's tokens does not wait for
the step launched after it."""

from __future__ import annotations

import pytest
import torch

from orcd.engine import Engine, FinishEvent, TokenEvent
from orcd.loader import load_model
from orcd.sampling import SamplingParams

from test_engine import prompt, recompute_greedy, request, run


@pytest.fixture(scope="module")
def phi(synth_model, plugins):
    return load_model(synth_model("phi3", "F32"), "cpu", plugins)


def summary(events: list) -> tuple:
    """What a client sees of one request: (index, token, text) per token, then the finish reason and counts."""
    finish = events[-1]
    assert isinstance(finish, FinishEvent)
    return ([(e.index, e.token_id, e.text) for e in events if isinstance(e, TokenEvent)], finish.reason,
            finish.prompt_tokens, finish.completion_tokens)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static-shapes"])
def test_overlap_gives_what_the_plain_step_gives(phi, plugins, static):
    """Three sequences of different lengths and max_tokens, one of them ending by a stop token mid-run: each
    request's events equal the plain step's, and every block is free at the end."""
    prompts = {"a": prompt(phi, 11, 30), "b": prompt(phi, 12, 7), "c": prompt(phi, 13, 19)}
    stop_at = recompute_greedy(phi, prompts["c"], 4)[3]  # c's fourth greedy token ends it (if not earlier)

    def requests():
        return [request("a", prompts["a"], 9, stop_token_ids=set()), request("b", prompts["b"], 4, stop_token_ids=set()),
                request("c", prompts["c"], 12, stop_token_ids={stop_at})]

    plain = run(Engine(phi, plugins, max_batch=3, n_ctx=96, static_shapes=static, overlap=False), *requests())
    engine = Engine(phi, plugins, max_batch=3, n_ctx=96, static_shapes=static, overlap=True)
    overlapped = run(engine, *requests())
    assert {k: summary(v) for k, v in overlapped.items()} == {k: summary(v) for k, v in plain.items()}
    assert summary(plain["c"])[1] == "eos" and summary(plain["a"])[1] == "max_tokens"
    assert engine.cache.blocks.available == engine.cache.n_blocks


def test_overlap_keeps_a_step_in_flight_and_yields_one_token_per_step(phi, plugins):
    engine = Engine(phi, plugins, max_batch=2, n_ctx=96, overlap=True)
    ids = {"a": prompt(phi, 14, 12), "b": prompt(phi, 15, 21)}
    for k, p in ids.items():
        engine.add_request(request(k, p, 6, stop_token_ids=set()))
    got: dict[str, list[int]] = {k: [] for k in ids}
    in_flight = []
    while engine.has_work():
        events = engine.step()
        token_events = [e for e in events if isinstance(e, TokenEvent)]
        assert sorted(e.request_id for e in token_events) == sorted(ids)
        for e in token_events:
            got[e.request_id].append(e.token_id)
        in_flight.append(engine._launched is not None)
    assert got == {k: recompute_greedy(phi, p, 6) for k, p in ids.items()}
    assert in_flight == [True] * 5 + [False]  # nothing runs ahead of the sixth token, known to be the last


def test_overlap_takes_cancels_at_once_and_new_requests_one_step_later(phi, plugins):
    engine = Engine(phi, plugins, max_batch=2, n_ctx=96, overlap=True)
    a, b = prompt(phi, 16, 10), prompt(phi, 17, 14)
    engine.add_request(request("a", a, 20, stop_token_ids=set()))
    assert len(engine.step()) == 1 and engine._launched is not None
    engine.add_request(request("b", b, 5, stop_token_ids=set()))  # a slot is free: the step ahead stops
    events = engine.step()
    assert [(e.request_id, e.index) for e in events] == [("a", 1)] and engine._launched is None
    events = engine.step()  # b is admitted now
    assert sorted((e.request_id, e.index) for e in events) == [("a", 2), ("b", 0)]
    assert engine.cancel("a")
    events = engine.step()  # the step in flight is read, but a's token is dropped and a ends
    finish = {e.request_id: e for e in events if isinstance(e, FinishEvent)}
    assert (finish["a"].reason, finish["a"].completion_tokens) == ("CANCELLED", 3)
    assert [(e.request_id, e.index) for e in events if isinstance(e, TokenEvent)] == [("b", 1)]
    b_tokens = [e.token_id for e in events if isinstance(e, TokenEvent) and e.request_id == "b"]
    while engine.has_work():
        b_tokens += [e.token_id for e in engine.step() if isinstance(e, TokenEvent)]
    assert b_tokens == recompute_greedy(phi, b, 5)[1:]
    assert not engine.has_work() and engine.cache.blocks.available == engine.cache.n_blocks


def test_sampled_sequences_take_the_plain_step(phi, plugins):
    """A batch with a sampler in its chain reads its tokens every step (no step ahead); seeded output as without
    overlap."""
    sampling = SamplingParams(temperature=0.8, top_k=20, seed=3)
    ids = prompt(phi, 18, 15)
    plain = run(Engine(phi, plugins, n_ctx=64, overlap=False), request("s", ids, 6, sampling=sampling))
    engine = Engine(phi, plugins, n_ctx=64, overlap=True)
    engine.add_request(request("s", ids, 6, sampling=sampling))
    events = []
    while engine.has_work():
        events += engine.step()
        assert engine._launched is None
    assert summary(events) == summary(plain["s"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reading_a_step_does_not_wait_for_the_step_in_flight(synth_model, plugins, monkeypatch):
    """On CUDA, ``step()`` returns step n's tokens while step n + 1 still runs: with every forward held on the
    device for about 0.1 s or more (``torch.cuda._sleep``, 2e8 clock cycles), the device is still busy whenever
    ``step()`` returns with a step in flight, and the tokens are the plain step's. (Read with ``tolist()``, step
    n's tokens were copied in stream order after step n + 1 and waited for it too.)"""
    loaded = load_model(synth_model("qwen2", "F32"), "cuda", plugins)
    forward = loaded.module.forward

    def slow_forward(*args, **kwargs):
        logits = forward(*args, **kwargs)
        torch.cuda._sleep(200_000_000)
        return logits

    ids = prompt(loaded, 19, 12)
    plain = run(Engine(loaded, plugins, n_ctx=64, overlap=False), request("p", ids, 5, stop_token_ids=set()))
    monkeypatch.setattr(loaded.module, "forward", slow_forward)
    engine = Engine(loaded, plugins, n_ctx=64, overlap=True)
    engine.add_request(request("p", ids, 5, stop_token_ids=set()))
    events, busy = [], []
    while engine.has_work():
        events += engine.step()
        if engine._launched is not None:
            busy.append(not torch.cuda.current_stream().query())
    assert busy == [True] * 4  # the fifth token is known to be the last: nothing runs ahead of it
    assert summary(events) == summary(plain["p"])
