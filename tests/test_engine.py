"""The engine on real synthetic models: batched steps, joining, cancelling, stop rules, validation, metrics hooks,
seeds and a third-party sampler in the chain."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import make_plugin_manager
from kernel_support import interpreter_only, take_path

import orcd
from orcd.engine import Engine, FinishEvent, GenerationRequest, TokenEvent
from orcd.engine.stops import StopStrings
from orcd.errors import Cancelled, InvalidRequest
from orcd.loader import load_model
from orcd.nn import ForwardBatch
from orcd.sampling import SamplerFactory, SamplingParams

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def qwen(synth_model, plugins):
    return load_model(synth_model("qwen2", "F32"), "cpu", plugins)


@pytest.fixture(scope="module")
def phi(synth_model, plugins):
    return load_model(synth_model("phi3", "F32"), "cpu", plugins)


def prompt(loaded, seed: int, length: int) -> list[int]:
    special = loaded.tokenizer.special_ids
    ordinary = [i for i in range(loaded.config.vocab_size) if i not in special]
    g = torch.Generator().manual_seed(seed)
    return [ordinary[i] for i in torch.randint(0, len(ordinary), (length,), generator=g)]


def request(rid: str, ids: list[int], n: int = 8, sampling: SamplingParams = GREEDY, **kw) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt_ids=ids, max_tokens=n, sampling=sampling, **kw)


def run(engine: Engine, *reqs: GenerationRequest) -> dict[str, list]:
    """Add the requests, step until done; every request's events in order."""
    for r in reqs:
        engine.add_request(r)
    out: dict[str, list] = {r.request_id: [] for r in reqs}
    while engine.has_work():
        for ev in engine.step():
            out[ev.request_id].append(ev)
    return out


def tokens(events: list) -> list[int]:
    return [e.token_id for e in events if isinstance(e, TokenEvent)]


def recompute_greedy(loaded, ids: list[int], n: int) -> list[int]:
    """Greedy without a cache: the whole sequence through the model for every token."""
    ids = list(ids)
    for _ in range(n):
        logits = loaded.module(ForwardBatch(torch.tensor([ids]), torch.arange(len(ids))[None]))
        ids.append(int(logits[0].argmax()))
    return ids[-n:]


def test_greedy_matches_recomputation_without_cache(phi, plugins):
    ids = prompt(phi, 0, 40)
    events = run(Engine(phi, plugins, n_ctx=128), request("a", ids, 10, stop_token_ids=set()))["a"]
    assert tokens(events) == recompute_greedy(phi, ids, 10)
    finish = events[-1]
    assert isinstance(finish, FinishEvent) and finish.reason == "max_tokens"
    assert (finish.prompt_tokens, finish.completion_tokens) == (40, 10)
    assert [e.index for e in events[:-1]] == list(range(10))
    assert finish.time_to_first_token_s > 0 and finish.decode_time_s > 0 and finish.seed is None


def test_batched_step_equals_each_sequence_alone(phi, plugins):
    """Three prompts of different lengths decode in one batched forward per step, each in its own cache slot,
    and produce what each produces alone; every step yields one token per active sequence."""
    prompts = {"long": prompt(phi, 1, 70), "short": prompt(phi, 2, 5), "mid": prompt(phi, 3, 33)}
    alone = {k: tokens(run(Engine(phi, plugins, n_ctx=128), request(k, p, 12, stop_token_ids=set()))[k])
             for k, p in prompts.items()}
    engine = Engine(phi, plugins, max_batch=3, n_ctx=128)
    for k, p in prompts.items():
        engine.add_request(request(k, p, 12, stop_token_ids=set()))
    got: dict[str, list[int]] = {k: [] for k in prompts}
    while engine.has_work():
        events = engine.step()
        token_events = [e for e in events if isinstance(e, TokenEvent)]
        assert sorted(e.request_id for e in token_events) == sorted(prompts)
        for e in token_events:
            got[e.request_id].append(e.token_id)
    assert got == alone


def test_request_joins_a_running_batch_and_waits_for_a_slot(phi, plugins):
    engine = Engine(phi, plugins, max_batch=2, n_ctx=128)
    a, b, c = prompt(phi, 4, 20), prompt(phi, 5, 9), prompt(phi, 6, 12)
    engine.add_request(request("a", a, 6, stop_token_ids=set()))
    first = [engine.step() for _ in range(3)]
    assert all(len(evs) == 1 for evs in first)
    engine.add_request(request("b", b, 3, stop_token_ids=set()))
    engine.add_request(request("c", c, 2, stop_token_ids=set()))  # no third slot: waits
    evs = engine.step()
    assert {(e.request_id, e.index) for e in evs} == {("a", 3), ("b", 0)}
    rest = {"a": [], "b": [], "c": []}
    for ev in evs:
        rest[ev.request_id].append(ev)
    while engine.has_work():
        for ev in engine.step():
            rest[ev.request_id].append(ev)
    assert tokens(rest["b"]) == recompute_greedy(phi, b, 3)
    assert tokens(rest["c"]) == recompute_greedy(phi, c, 2)  # got b's slot after b finished
    assert engine.cache.blocks.available == engine.cache.n_blocks


def test_cancel_running_and_waiting(phi, plugins):
    engine = Engine(phi, plugins, max_batch=1, n_ctx=64)
    engine.add_request(request("run", prompt(phi, 7, 10), 50))
    engine.add_request(request("wait", prompt(phi, 8, 10), 50))
    engine.step()
    assert engine.cancel("run") and engine.cancel("wait") and not engine.cancel("nobody")
    events = engine.step()
    finishes = {e.request_id: e for e in events if isinstance(e, FinishEvent)}
    assert set(finishes) == {"run", "wait"} and not [e for e in events if isinstance(e, TokenEvent)]
    assert finishes["run"].reason == "CANCELLED" and isinstance(finishes["run"].error, Cancelled)
    assert finishes["run"].completion_tokens == 1 and finishes["wait"].completion_tokens == 0
    assert not engine.has_work() and engine.cache.blocks.available == engine.cache.n_blocks


def test_stop_string_cuts_the_text_and_is_never_emitted(phi, plugins):
    ids = prompt(phi, 9, 30)
    full = run(Engine(phi, plugins, n_ctx=128), request("a", ids, 24, stop_token_ids=set()))["a"]
    text = "".join(e.text for e in full if isinstance(e, TokenEvent))
    pieces = [e.text for e in full if isinstance(e, TokenEvent)]
    # a stop string that spans a token boundary, from the middle of the text
    i = next(k for k in range(3, len(pieces)) if pieces[k - 1] and pieces[k])
    start = sum(len(p) for p in pieces[:i]) - 1
    stop = text[start : start + 2]
    cut = text.index(stop)
    events = run(Engine(phi, plugins, n_ctx=128), request("b", ids, 24, stop_strings=[stop], stop_token_ids=set()))["b"]
    out = "".join(e.text for e in events if isinstance(e, TokenEvent))
    assert events[-1].reason == "stop_sequence"
    assert out == text[:cut] and stop not in out


def test_stop_strings_hold_back_possible_starts():
    s = StopStrings(["STOP", "ab"])
    assert s.push("xxST") == ("xx", False)  # "ST" may start "STOP"
    assert s.push("O") == ("", False)
    assert s.push("x") == ("STOx", False)  # it did not
    assert s.push("a") == ("", False)
    assert s.push("b tail") == ("", True)
    s = StopStrings(["END"])
    assert s.push("the E") == ("the ", False) and s.flush() == "E"  # the sequence ended another way
    assert StopStrings([]).push("abc") == ("abc", False)


def test_stop_token_and_tokenizer_end_of_generation(qwen, phi, plugins):
    ids = prompt(phi, 10, 20)
    greedy = recompute_greedy(phi, ids, 6)
    stop = greedy[4]
    events = run(Engine(phi, plugins, n_ctx=64), request("a", ids, 20, stop_token_ids={stop}))["a"]
    assert tokens(events) == greedy[: greedy.index(stop) + 1]
    assert events[-1].reason == "eos" and events[-2].text == ""
    # by default the tokenizer's end-of-generation tokens stop: Qwen's <|im_end|> and <|endoftext|>
    assert Engine(qwen, plugins, n_ctx=32).default_stop_ids == set(qwen.tokenizer.eot_ids)
    assert qwen.tokenizer.token_to_id("<|im_end|>") in qwen.tokenizer.eot_ids


def test_context_full_ends_the_sequence(phi, plugins):
    """A 60-token prompt in a 64-token context leaves room for 5 tokens (the last one is never fed back)."""
    events = run(Engine(phi, plugins, n_ctx=64), request("a", prompt(phi, 11, 60), 100, stop_token_ids=set()))["a"]
    assert events[-1].reason == "max_tokens" and events[-1].completion_tokens == 5


@pytest.mark.parametrize("change,field", [
    (dict(prompt_ids=list(range(3, 70))), "prompt_ids"),  # longer than n_ctx 64
    (dict(prompt_ids=[]), "prompt_ids"),
    (dict(prompt_ids=[5, 10**6]), "prompt_ids"),
    (dict(max_tokens=0), "max_tokens"),
])
def test_invalid_requests_name_the_field(phi, plugins, change, field):
    engine = Engine(phi, plugins, n_ctx=64)
    fields = dict(request_id="x", prompt_ids=[5, 6, 7], max_tokens=4) | change
    with pytest.raises(InvalidRequest) as e:
        engine.add_request(GenerationRequest(**fields))
    assert e.value.field == field and not engine.has_work()


def test_duplicate_request_id_and_oversized_context(phi, plugins):
    engine = Engine(phi, plugins, n_ctx=64)
    engine.add_request(request("same", [5, 6], 2))
    with pytest.raises(InvalidRequest) as e:
        engine.add_request(request("same", [5, 6], 2))
    assert e.value.field == "request_id"
    with pytest.raises(InvalidRequest) as e:
        Engine(phi, plugins, n_ctx=phi.config.context_length + 1)
    assert e.value.field == "n_ctx"


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    @orcd.hookimpl
    def request_started(self, event):
        self.events.append(("started", event))

    @orcd.hookimpl
    def token_produced(self, event):
        self.events.append(("token", event))

    @orcd.hookimpl
    def request_finished(self, event):
        self.events.append(("finished", event))


class Broken:
    @orcd.hookimpl
    def token_produced(self, event):
        raise RuntimeError("a metrics plugin with a bug")


def test_metrics_hooks_get_every_request_event(synth_model):
    pm = make_plugin_manager("quant_formats", "llama_adapter")
    recorder = Recorder()
    pm.register(recorder, name="recorder")
    pm.register(Broken(), name="broken")  # logged, and the request goes on
    loaded = load_model(synth_model("qwen2", "F32"), "cpu", pm)
    events = run(Engine(loaded, pm, n_ctx=64), request("m", [10, 11, 12, 13], 5, stop_token_ids=set()))["m"]
    kinds = [k for k, _ in recorder.events]
    assert kinds == ["started"] + ["token"] * 5 + ["finished"]
    started, finished = recorder.events[0][1], recorder.events[-1][1]
    assert started.request_id == "m" and started.prompt_tokens == 4
    assert [e.index for k, e in recorder.events if k == "token"] == list(range(5))
    assert [e.token_id for k, e in recorder.events if k == "token"] == tokens(events)
    assert finished.outcome == "max_tokens" and finished.completion_tokens == 5
    assert finished.time_to_first_token_s == pytest.approx(events[-1].time_to_first_token_s)
    assert finished.decode_tokens_per_s > 0


def test_seeded_sampling_is_reproducible(phi, plugins):
    hot = SamplingParams(temperature=1.5, seed=1234)
    ids = prompt(phi, 12, 16)

    def sample(params: SamplingParams) -> tuple[list[int], int | None]:
        events = run(Engine(phi, plugins, n_ctx=64), request("s", ids, 24, params, stop_token_ids=set()))["s"]
        return tokens(events), events[-1].seed

    first, seed = sample(hot)
    assert seed == 1234 and sample(hot)[0] == first
    assert sample(hot.model_copy(update={"seed": 1235}))[0] != first
    drawn, drawn_seed = sample(SamplingParams(temperature=1.5))  # no seed: one is drawn and reported
    assert drawn_seed is not None
    assert sample(SamplingParams(temperature=1.5, seed=drawn_seed))[0] == drawn
    # batched with another sequence, a seeded sequence still draws the same tokens
    engine = Engine(phi, plugins, max_batch=2, n_ctx=64)
    out = run(engine, request("s", ids, 24, hot, stop_token_ids=set()),
              request("other", prompt(phi, 13, 7), 24, SamplingParams(temperature=1.0), stop_token_ids=set()))
    assert tokens(out["s"]) == first


class Forbid(SamplerFactory):
    """A third-party sampler: never pick the ids in ``extra["forbid"]``."""

    name, order = "forbid", 150

    def create(self, params: SamplingParams):
        banned = params.extra.get("forbid")
        if not banned:
            return None

        def apply(logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
            logits[torch.tensor(banned, device=logits.device)] = float("-inf")
            return logits

        return apply


class ForbidPlugin:
    @orcd.hookimpl
    def register_samplers(self, register: Callable) -> None:
        register(Forbid())


def test_third_party_sampler_joins_the_chain(synth_model):
    pm = make_plugin_manager("quant_formats", "llama_adapter")
    pm.register(ForbidPlugin(), name="forbid-plugin")
    assert "forbid" in pm.samplers
    loaded = load_model(synth_model("phi3", "F32"), "cpu", pm)
    ids = prompt(loaded, 14, 20)
    plain = tokens(run(Engine(loaded, pm, n_ctx=64), request("p", ids, 8, stop_token_ids=set()))["p"])
    banned = sorted(set(plain))
    forbidding = GREEDY.model_copy(update={"extra": {"forbid": banned}})
    got = tokens(run(Engine(loaded, pm, n_ctx=64), request("f", ids, 8, forbidding, stop_token_ids=set()))["f"])
    assert not set(got) & set(banned)
    # forbid everything but EOS: the default stop rule ends the request at once
    eos = loaded.tokenizer.eos_id
    only_eos = GREEDY.model_copy(update={"extra": {"forbid": [i for i in range(loaded.config.vocab_size) if i != eos]}})
    events = run(Engine(loaded, pm, n_ctx=64), request("e", ids, 8, only_eos))["e"]
    assert tokens(events) == [eos] and events[-1].reason == "eos"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_streamed_text_is_the_decoded_text(qwen, plugins, seed):
    """Hot sampling over a byte-level vocabulary splits characters across tokens; the streamed pieces are
    whole characters and join to the tokenizer's decoding of the generated ids."""
    events = run(Engine(qwen, plugins, n_ctx=96),
                 request("t", prompt(qwen, seed, 8), 60, SamplingParams(temperature=3.0, seed=seed),
                         stop_token_ids=set()))["t"]
    ids = tokens(events)
    text = "".join(e.text for e in events if isinstance(e, TokenEvent))
    assert text == qwen.tokenizer.decode(ids, skip_special=True)


@pytest.mark.gpu
@pytest.mark.parametrize("file_type", ["F32", "Q8_0", "Q4_K_M"])
@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_cuda_engine_matches_cpu(synth_model, plugins, arch, file_type):
    """On CUDA (FP16 KV cache) the prompt logits stay within 2e-2 of the CPU's FP32 run (FP16 keys and values
    carry ~1e-3 relative error into attention) and greedy decoding through the engine gives the same tokens on
    a prompt whose top-2 gaps are wide."""
    from reference_llama import prompt_logits, well_conditioned_prompt

    path = synth_model(arch, file_type)
    cpu = load_model(path, "cpu", plugins)
    gpu = load_model(path, "cuda", plugins)
    ids = prompt(cpu, 15, 80)
    ref = prompt_logits(cpu, ids, 256)
    gpu.module.set_context_length(256)
    from orcd.engine.kv_cache import KVCache

    cache = KVCache.for_model(gpu.config, 1, 256, gpu.device)
    assert cache.dtype == torch.float16
    batch = ForwardBatch(torch.tensor([ids], device="cuda"), torch.arange(len(ids), device="cuda")[None], cache, [0])
    got = gpu.module(batch, all_logits=True)[0].cpu()
    assert (got - ref).abs().max().item() < 2e-2
    chosen, expected, _ = well_conditioned_prompt(cpu, plugins, margin=0.04)
    events = run(Engine(gpu, plugins, n_ctx=256), request("g", chosen, 32, stop_token_ids=set()))["g"]
    assert tokens(events) == expected


class _RefusingSampler(SamplerFactory):
    """Fails while a request is being admitted (after its cache slot is taken) when asked to."""

    name, order = "refuse_on_request", 5

    def create(self, params: SamplingParams):
        if params.extra.get("refuse"):
            raise InvalidRequest("this sampler refuses the request", field="extra")


class _RefusingPlugin:
    @orcd.hookimpl
    def register_samplers(self, register):
        register(_RefusingSampler())


def test_a_request_failing_at_admission_gives_its_cache_slot_back(synth_model) -> None:
    pm = make_plugin_manager("quant_formats", "llama_adapter")
    pm.register(_RefusingPlugin(), name="refusing")
    loaded = load_model(synth_model("qwen2", "F32"), "cpu", pm)
    engine = Engine(loaded, pm, max_batch=1, n_ctx=64)
    ids = prompt(loaded, 3, 10)
    bad = request("bad", ids, sampling=SamplingParams(temperature=0.0, extra={"refuse": True}))
    out = run(engine, bad, request("good", ids))
    assert [e.reason for e in out["bad"]] == ["INVALID_REQUEST"]
    assert isinstance(out["good"][-1], FinishEvent) and out["good"][-1].reason == "max_tokens"
    assert engine.cache.blocks.available == engine.cache.n_blocks


def test_warm_up_runs_every_batch_bucket_and_leaves_no_trace(synth_model):
    """``warm_up`` (what the server runs before serving on a GPU) prefills a full chunk and decodes at every batch
    bucket, reports nothing to the metrics hooks, restarts the prefix-cache statistics, and leaves the engine
    producing exactly what a fresh engine produces."""
    pm = make_plugin_manager("quant_formats", "llama_adapter")
    recorder = Recorder()
    pm.register(recorder, name="recorder")
    loaded = load_model(synth_model("qwen2", "F32"), "cpu", pm)
    warm = Engine(loaded, pm, max_batch=4, n_ctx=96, static_shapes=True)
    seconds = warm.warm_up()
    assert seconds > 0 and not warm.has_work() and not recorder.events
    assert warm.prefix_cache_stats == (0, 0)
    assert warm.static is not None and warm.static.buckets == [1, 2, 4]
    reqs = [request(f"r{i}", prompt(loaded, i, 20 + i), 6, stop_token_ids=set()) for i in range(3)]
    fresh = Engine(loaded, pm, max_batch=4, n_ctx=96, static_shapes=True)
    assert {k: tokens(v) for k, v in run(warm, *reqs).items()} == {k: tokens(v) for k, v in run(fresh, *reqs).items()}
    assert [k for k, _ in recorder.events].count("started") == 6  # the real requests, from both engines


def test_warm_up_needs_an_idle_engine(qwen, plugins):
    engine = Engine(qwen, plugins, n_ctx=64)
    engine.add_request(request("busy", [10, 11, 12], 2))
    with pytest.raises(RuntimeError, match="idle"):
        engine.warm_up()


@interpreter_only
@pytest.mark.parametrize("arch,file_type", [("phi3", "Q4_K_M"), ("gpt-oss", "MXFP4")])
def test_a_decode_batch_on_the_kernels_path_equals_the_reference_path(synth_model, plugins, arch, file_type,
                                                                       monkeypatch):
    """A decode step of nine sequences: past the decode kernel's rows, so its projections take the tl.dot kernel
    (GPT-OSS's 36 (token, expert) pairs the grouped one), here in Triton's interpreter. Its logits equal the
    reference path's step from the same cache within 1e-4 (both fp32; measured 4.8e-7 for Phi-3, 6.7e-6 for
    GPT-OSS). The prompts are written by the reference path (an interpreted forward takes 20-40 s)."""
    import copy

    from orcd.engine.kv_cache import KVCache

    calls = take_path(monkeypatch, "interpreted-kernels")
    loaded = load_model(synth_model(arch, file_type), "cpu", plugins)  # projections stacked as on CUDA
    ids = torch.tensor(prompt(loaded, 21, 9 * 7)).reshape(9, 7)
    cache = KVCache.for_model(loaded.config, 9, 64, "cpu")
    slots = list(range(9))
    with monkeypatch.context() as reference:
        reference.setenv("ORCD_KERNELS", "0")
        loaded.module(ForwardBatch(ids[:, :6], torch.arange(6).expand(9, 6), cache, slots))
        twin = copy.deepcopy(cache)
        expected = loaded.module(ForwardBatch(ids[:, 6:], torch.full((9, 1), 6), cache, slots))
    assert calls.linear == calls.experts == 0
    got = loaded.module(ForwardBatch(ids[:, 6:], torch.full((9, 1), 6), twin, slots))
    assert calls.took("interpreted-kernels"), calls
    assert (got - expected).abs().max().item() < 1e-4
