"""``orcd generate`` and ``orcd tokenize`` through the CLI entry point, on synthetic models."""

from __future__ import annotations

import json

import pytest

import orcd.plugins
from conftest import require_reference
from orcd.cli import main
from orcd.engine import Engine, FinishEvent, GenerationRequest
from orcd.loader import load_model
from orcd.sampling import SamplingParams

PROMPT = "Once upon a time, 3 foxes"


@pytest.fixture(autouse=True)
def project_plugins(monkeypatch, plugins):
    """The CLI asks for the process-wide manager; give it the test's (no entry-point autoloading)."""
    monkeypatch.setattr(orcd.plugins, "_default", plugins)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_greedy_prints_only_the_text(capsys, synth_model, plugins):
    path = synth_model("phi3", "Q8_0")
    code, out, err = cli(capsys, "generate", "--model", str(path), "--temperature", "0", "--max-tokens", "12",
                         "--device", "cpu", PROMPT)
    assert code == 0
    loaded = load_model(path, "cpu", plugins)
    ids = loaded.tokenizer.encode(PROMPT)
    events = list(Engine(loaded, plugins, n_ctx=64).generate(
        GenerationRequest(request_id="r", prompt_ids=ids, max_tokens=12, sampling=SamplingParams(temperature=0))))
    expected = "".join(e.text for e in events if not isinstance(e, FinishEvent))
    assert out == expected + "\n"
    assert "prompt tokens" in err and "tokens/s" in err


def test_generate_json_and_seed(capsys, synth_model, plugins):
    path = str(synth_model("qwen2", "F32"))
    args = ["generate", "--model", path, "--json", "--max-tokens", "10", "--temperature", "1.2", "--seed", "7",
            PROMPT]
    code, out, _ = cli(capsys, *args)
    first = json.loads(out)
    assert code == 0 and set(first) == {"prompt_ids", "token_ids", "text", "finish_reason", "seed"}
    tok = load_model(path, "cpu", plugins).tokenizer
    assert first["prompt_ids"] == tok.encode(PROMPT) and first["seed"] == 7
    assert len(first["token_ids"]) <= 10 and first["finish_reason"] in ("max_tokens", "eos")
    assert first["text"] == tok.decode(first["token_ids"], skip_special=True)
    assert json.loads(cli(capsys, *args)[1]) == first  # same seed, same tokens


def test_generate_chat_renders_the_template(capsys, synth_model, plugins):
    path = str(synth_model("phi3", "F32"))
    code, out, _ = cli(capsys, "generate", "--model", path, "--chat", "--json", "--max-tokens", "3",
                       "--temperature", "0", "Hello!")
    loaded = load_model(path, "cpu", plugins)
    rendered = loaded.chat_template.render([{"role": "user", "content": "Hello!"}], True)
    ids = json.loads(out)["prompt_ids"]
    assert code == 0 and ids == loaded.tokenizer.encode(rendered)
    assert ids[0] == loaded.tokenizer.bos_id and loaded.tokenizer.token_to_id("<|user|>") in ids


def test_generate_errors_go_to_stderr(capsys, synth_model):
    path = str(synth_model("qwen2", "F32"))
    code, out, err = cli(capsys, "generate", "--model", path, "--device", "tpu", "x")
    assert code == 1 and out == "" and "device" in err
    code, _, err = cli(capsys, "generate", "--model", path, "--top-p", "1.5", "x")
    assert code == 1 and "top_p" in err


@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_tokenize_matches_llama_cpp(capsys, synth_model, arch):
    """The same ids as llama.cpp's tokenizer (vocab only), with special-token parsing on and off, BOS or not."""
    llama_cpp = require_reference("llama_cpp")
    path = str(synth_model(arch, "F32"))
    llm = llama_cpp.Llama(path, vocab_only=True, verbose=True)
    text = "Hi <|endoftext|> there,  123\tend"
    for flags, add_bos, special in (([], False, True), (["--no-special"], False, False), (["--add-bos"], True, True)):
        code, out, _ = cli(capsys, "tokenize", "--model", path, *flags, text)
        ref = llm.tokenize(text.encode(), add_bos=False, special=special)
        if add_bos:
            ref = [llm.token_bos(), *ref]
        assert code == 0 and json.loads(out) == ref, flags
