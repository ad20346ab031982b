"""gpt-oss in the harmony chat format, end to end on the tiny model: the prompt rendered from the GGUF's template,
generation through the engine ending on ``<|return|>`` or ``<|call|>`` (never on ``<|end|>``, which closes a message
inside the turn), and the reply split into its analysis and final channels.

A random model does not write harmony by itself, so a sampler plugin (registered through the sampler hook like any
third-party one) forces a scripted reply token by token; the stop rules, the tokenizer and the channel split under
test are the real ones. The end-of-generation set is checked against llama.cpp's."""

from __future__ import annotations

import pytest
import torch

import orcd
from orcd.chat import split_harmony_channels
from orcd.engine import Engine, FinishEvent, GenerationRequest, TokenEvent
from orcd.loader import load_model
from orcd.sampling import SamplerFactory, SamplingParams

from conftest import make_plugin_manager, require_reference

THINK_AND_ANSWER = ("<|channel|>analysis<|message|>The user asks for the capital of France. It is Paris.<|end|>"
                    "<|start|>assistant<|channel|>final<|message|>The capital of France is Paris.<|return|>")
TOOL_CALL = ("<|channel|>analysis<|message|>Need the weather: call the tool.<|end|>"
             "<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>"
             '{"city": "Paris"}<|call|>')
AFTER_THE_END = "This text must never be generated."


class ScriptedReply(SamplerFactory):
    """Leaves only the next token of ``extra["script"]`` (a list of ids after ``extra["prompt_len"]`` prompt
    tokens) possible."""

    name, order = "scripted_reply", 1

    def create(self, params: SamplingParams):
        script, prompt_len = params.extra.get("script"), params.extra.get("prompt_len")
        if script is None:
            return None

        def force(logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
            forced = torch.full_like(logits, float("-inf"))
            forced[script[history.numel() - prompt_len]] = 0.0
            return forced

        return force


class _ScriptPlugin:
    @orcd.hookimpl
    def register_samplers(self, register) -> None:
        register(ScriptedReply())


@pytest.fixture(scope="module")
def harmony_engine(synth_model):
    plugins = make_plugin_manager()
    plugins.register(_ScriptPlugin(), name="scripted_reply")
    loaded = load_model(synth_model("gpt-oss", "MXFP4"), plugins=plugins)
    return Engine(loaded, plugins, n_ctx=1024), loaded


def _run(engine: Engine, loaded, reply: str) -> tuple[list[int], list[int], FinishEvent]:
    tok = loaded.tokenizer
    prompt_text = loaded.chat_template.render(
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
    )
    prompt = tok.encode(prompt_text, add_special=False)
    script = tok.encode(reply + AFTER_THE_END, add_special=False)
    request = GenerationRequest(
        request_id=reply[:20], prompt_ids=prompt, max_tokens=len(script),
        sampling=SamplingParams(temperature=0.0, extra={"script": script, "prompt_len": len(prompt)}),
    )
    events = list(engine.generate(request))
    generated = [e.token_id for e in events if isinstance(e, TokenEvent)]
    return prompt, generated, events[-1]


def test_prompt_is_rendered_from_the_gguf_template(harmony_engine) -> None:
    engine, loaded = harmony_engine
    tok = loaded.tokenizer
    prompt, _, _ = _run(engine, loaded, THINK_AND_ANSWER)
    text = tok.decode(prompt, skip_special=False)
    assert text.startswith("<|start|>system<|message|>You are ChatGPT")
    assert "<|start|>developer<|message|># Instructions\n\nAnswer briefly.\n\n<|end|>" in text
    assert text.endswith("<|start|>user<|message|>What is the capital of France?<|end|><|start|>assistant")
    # The harmony markers are single special tokens, not spelled out in bytes.
    assert prompt.count(tok.token_to_id("<|start|>")) == 4 and prompt.count(tok.token_to_id("<|end|>")) == 3
    assert prompt.count(tok.token_to_id("<|message|>")) == 3


def test_reply_ends_on_return_not_on_end_and_splits_into_channels(harmony_engine) -> None:
    engine, loaded = harmony_engine
    tok = loaded.tokenizer
    _, generated, finish = _run(engine, loaded, THINK_AND_ANSWER)
    assert finish.reason == "eos"
    assert generated == tok.encode(THINK_AND_ANSWER, add_special=False)  # through <|end|>, stopped at <|return|>
    channels = split_harmony_channels(tok.decode(generated, skip_special=False))
    assert channels["analysis"] == "The user asks for the capital of France. It is Paris."
    assert channels["final"] == "The capital of France is Paris."
    assert channels["tool_calls"] == []


def test_tool_call_ends_on_call(harmony_engine) -> None:
    engine, loaded = harmony_engine
    tok = loaded.tokenizer
    _, generated, finish = _run(engine, loaded, TOOL_CALL)
    assert finish.reason == "eos" and generated[-1] == tok.token_to_id("<|call|>")
    channels = split_harmony_channels(tok.decode(generated, skip_special=False))
    assert channels["final"] == ""
    assert channels["tool_calls"] == [{"recipient": "functions.get_weather", "content_type": "json",
                                       "arguments": '{"city": "Paris"}'}]


@pytest.mark.reference
def test_end_of_generation_tokens_are_llama_cpp_s(harmony_engine) -> None:
    llama_cpp = require_reference("llama_cpp")
    engine, loaded = harmony_engine
    tok = loaded.tokenizer
    llm = llama_cpp.Llama(str(loaded.path), n_ctx=64, verbose=True)  # verbose=False may crash llama-cpp-python
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    theirs = {i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    assert engine.default_stop_ids == theirs
    assert {tok.token_to_id("<|return|>"), tok.token_to_id("<|call|>")} <= theirs
    assert tok.token_to_id("<|end|>") not in theirs
