"""The OpenAI-compatible API, driven by the official ``openai`` client against a real uvicorn server on loopback
(tiny synthetic Qwen2, real engine). Where the client hides the wire format (SSE chunks, error bodies), httpx
checks it directly."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from conftest import make_plugin_manager
from server_harness import LiveServer

API_KEY = "sk-test-orcd"


@pytest.fixture(scope="module")
def live(synth_model) -> LiveServer:
    path: Path = synth_model("qwen2", "F32")
    server = LiveServer(path, make_plugin_manager("quant_formats", "llama_adapter"), api_key=API_KEY)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def oai(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_id(live: LiveServer) -> str:
    return live.worker.config.model_id


def test_models(oai: openai.OpenAI, model_id: str) -> None:
    models = oai.models.list()
    assert [m.id for m in models.data] == [model_id]
    assert models.data[0].owned_by == "orcd"
    assert oai.models.retrieve(model_id).id == model_id
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-4")


# --- /v1/completions ---------------------------------------------------------------------------------------------


def test_completion(oai: openai.OpenAI, live: LiveServer, model_id: str) -> None:
    prompt = "The capital of France is"
    r = oai.completions.create(model=model_id, prompt=prompt, max_tokens=12, temperature=0.8, seed=3)
    assert r.object == "text_completion" and r.model == model_id and r.id.startswith("cmpl-")
    choice = r.choices[0]
    assert len(r.choices) == 1 and choice.index == 0
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(live.worker.encode_prompt(prompt))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 12
    again = oai.completions.create(model=model_id, prompt=prompt, max_tokens=12, temperature=0.8, seed=3)
    assert again.choices[0].text == choice.text and again.usage == r.usage  # seeded: same tokens


def test_completion_stream_matches_non_stream(oai: openai.OpenAI, model_id: str) -> None:
    args = {"model": model_id, "prompt": "Once upon a time", "max_tokens": 20, "temperature": 0.9, "seed": 11}
    whole = oai.completions.create(**args)
    chunks = list(oai.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage  # include_usage: a last, usage-only chunk
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_without_usage(oai: openai.OpenAI, model_id: str) -> None:
    chunks = list(oai.completions.create(model=model_id, prompt="abc", max_tokens=5, temperature=0, stream=True))
    assert chunks and all(c.usage is None and len(c.choices) == 1 for c in chunks)


def test_completion_stop(oai: openai.OpenAI, model_id: str) -> None:
    full = oai.completions.create(model=model_id, prompt="Numbers:", max_tokens=40, temperature=0).choices[0].text
    stop = next((full[i:i + 2] for i in range(5, len(full) - 2) if full[i:i + 2].strip()), None)
    if stop is None:
        pytest.skip("the greedy continuation has no stop candidate")
    r = oai.completions.create(model=model_id, prompt="Numbers:", max_tokens=40, temperature=0, stop=stop)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == full[: full.index(stop)]


def test_wire_format_of_stream(live: LiveServer, model_id: str) -> None:
    body = {"model": model_id, "prompt": "hi", "max_tokens": 3, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    objs = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(o["object"] == "text_completion" and o["id"] == objs[0]["id"] for o in objs)
    assert objs[-1]["usage"]["completion_tokens"] == 3


# --- /v1/chat/completions ------------------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]


def test_chat(oai: openai.OpenAI, live: LiveServer, model_id: str) -> None:
    r = oai.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=16, temperature=0.7, seed=5)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    # the prompt is the GGUF's chat template applied to the messages, with the assistant turn opened
    rendered = live.worker.loaded.chat_template.render(MESSAGES, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(live.worker.encode_prompt(rendered))
    again = oai.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=16, temperature=0.7, seed=5)
    assert again.choices[0].message.content == msg.content


def test_chat_stream(oai: openai.OpenAI, model_id: str) -> None:
    args = {"model": model_id, "messages": MESSAGES, "max_completion_tokens": 16, "temperature": 0.7, "seed": 9}
    whole = oai.chat.completions.create(**args)
    chunks = list(oai.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage == whole.usage


def test_chat_content_parts(oai: openai.OpenAI, model_id: str) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hello."}]}]
    a = oai.chat.completions.create(model=model_id, messages=parts, max_tokens=8, temperature=0)
    b = oai.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Say hello."}],
                                    max_tokens=8, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content


# --- refusals ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra,field", [
    ({"n": 2}, "n"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"logprobs": True}, "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"temperature": 3.0}, "temperature"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"frobnicate": 1}, "frobnicate"),
])
def test_chat_unsupported_fields_named(oai: openai.OpenAI, model_id: str, extra: dict, field: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=4, extra_body=extra)
    assert e.value.status_code == 400
    body = e.value.body
    assert body["param"].split(".")[0] == field and field in body["message"]
    assert body["type"] == "invalid_request_error"


@pytest.mark.parametrize("extra,field", [
    ({"echo": True}, "echo"),
    ({"best_of": 3}, "best_of"),
    ({"suffix": "end"}, "suffix"),
    ({"n": 3}, "n"),
    ({"prompt": ["a", "b"]}, "prompt"),
])
def test_completion_unsupported_fields_named(oai: openai.OpenAI, model_id: str, extra: dict, field: str) -> None:
    args = {"model": model_id, "prompt": "x", "max_tokens": 4}
    args.update({k: v for k, v in extra.items() if k == "prompt"})
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(**args, extra_body={k: v for k, v in extra.items() if k != "prompt"})
    assert e.value.body["param"] == field and field in e.value.body["message"]


def test_wrong_api_key(live: LiveServer, model_id: str) -> None:
    bad = openai.OpenAI(base_url=f"{live.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=model_id, prompt="x", max_tokens=2)


def test_prompt_longer_than_context(oai: openai.OpenAI, model_id: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=model_id, prompt="lorem ipsum dolor sit amet " * 800, max_tokens=4)
    assert e.value.body["param"] == "prompt"


def test_harmony_channels_split_while_streaming() -> None:
    """GPT-OSS answers in harmony channels; streamed pieces (cut anywhere, special tokens whole as the engine
    emits them) must add up to the same reasoning and content as splitting the whole text."""
    from orcd.chat import split_harmony_channels
    from orcd.server.openai_api import HarmonyChannels

    text = ("<|channel|>analysis<|message|>The user greets; answer briefly.<|end|>"
            "<|start|>assistant<|channel|>final<|message|>Hello! How can I help?")
    pieces = []
    for special in ("<|channel|>", "<|message|>", "<|end|>", "<|start|>"):
        text = text.replace(special, f"\0{special}\0")
    for part in text.split("\0"):
        if part.startswith("<|"):
            pieces.append(part)
        else:
            pieces += [part[j:j + 3] for j in range(0, len(part), 3)]
    whole = "".join(pieces)
    channels = HarmonyChannels()
    reasoning = content = ""
    for piece in pieces:
        r, c = channels.feed(piece)
        reasoning += r
        content += c
    expected = split_harmony_channels(whole)
    assert reasoning == expected["analysis"] == "The user greets; answer briefly."
    assert content == expected["final"] == "Hello! How can I help?"


def test_gpt_oss_is_served(synth_model) -> None:
    """GPT-OSS (MoE, MXFP4) through the same server: its chat template speaks harmony, so chat answers go through
    the channel split; random weights write no markup, so all of it is the final channel."""
    from orcd.server.openai_api import speaks_harmony

    path = synth_model("gpt-oss", "MXFP4")
    live = LiveServer(path, make_plugin_manager())
    try:
        assert speaks_harmony(live.worker)
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)
        args = {"model": "gpt-oss", "messages": MESSAGES, "max_tokens": 12, "temperature": 0.7, "seed": 4}
        whole = client.chat.completions.create(**args)
        streamed = list(client.chat.completions.create(**args, stream=True))
        content = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert whole.usage.completion_tokens == 12 or whole.choices[0].finish_reason == "stop"
        assert content == whole.choices[0].message.content
        with httpx.stream("POST", f"{live.url}/execute", json={"job_id": "g", "prompt": "Hello", "max_tokens": 6},
                          timeout=60) as r:
            lines = [line for line in r.iter_lines() if line.startswith("event:")]
        assert lines[0] == "event: started" and lines[-1] == "event: end"
    finally:
        live.stop()
