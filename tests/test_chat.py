"""Chat templates: the real Qwen2.5, Phi-3 and GPT-OSS templates render exactly as transformers'
apply_chat_template renders them; hostile templates are stopped by the sandbox with an orcd error; stop tokens;
harmony channel splitting; a rendered prompt tokenizes as llama.cpp tokenizes it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from conftest import require_reference
from orcd.chat import ChatTemplate, split_harmony_channels
from orcd.errors import InvalidRequest, ModelFileError
from orcd.modelfile import ModelFile
from orcd.testing.templates import GPT_OSS_HARMONY, PHI3_MINI_INSTRUCT, QWEN2_5_INSTRUCT
from orcd.tokenizer import Tokenizer
from tokenizer_support import KINDS, LlamaVocab, write_vocab_gguf

TEMPLATES = {
    "qwen2.5": (QWEN2_5_INSTRUCT, "<|endoftext|>", "<|im_end|>"),
    "phi-3": (PHI3_MINI_INSTRUCT, "<s>", "<|endoftext|>"),
    "gpt-oss": (GPT_OSS_HARMONY, "<|startoftext|>", "<|return|>"),
}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "City <name> & country"},
        "unit": {"type": "string", "enum": ["c", "f"], "default": "c"},
        "days": {"type": "array", "items": {"type": "integer"}},
        "detail": {"type": "boolean"},
    }},
}}]
CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is 2+2?"}],
    "system": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi <b>&</b> ünï 中文 😀"},
               {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "  spaces\n\nand lines  "}],
    "tools": [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": "", "tool_calls": [
                  {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
              {"role": "tool", "content": '{"temp": 21, "sky": "clear"}'},
              {"role": "assistant", "content": "It is 21°C and clear."}],
    "thinking": [{"role": "developer", "content": "Think first."}, {"role": "user", "content": "Why?"},
                 {"role": "assistant", "content": "Because.", "thinking": "The user asks why."}],
}


def _hf_render(transformers, template: str, bos: str, eos: str, messages, **kwargs) -> str:
    from tokenizers import Tokenizer as HFTokenizer, models

    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=HFTokenizer(models.BPE()), chat_template=template,
                                               bos_token=bos, eos_token=eos)
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


@pytest.mark.reference
@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("with_tools", [False, True])
def test_real_templates_render_as_transformers_does(name, conversation, add_generation_prompt, with_tools) -> None:
    transformers = require_reference("transformers")
    template, bos, eos = TEMPLATES[name]
    messages = CONVERSATIONS[conversation]
    if name == "phi-3" and conversation == "tools":
        messages = [m for m in messages if m["role"] != "tool"]
    extra = {"tools": TOOLS} if with_tools else {}
    if name == "gpt-oss" and conversation == "tools":
        messages = [{k: v for k, v in m.items() if k != "content" or v} for m in messages]  # harmony: no empty content
    expected = _hf_render(transformers, template, bos, eos, messages, add_generation_prompt=add_generation_prompt,
                          **extra)
    before = copy.deepcopy(messages)
    ours = ChatTemplate.from_string(template, bos_token=bos, eos_token=eos).render(
        messages, add_generation_prompt=add_generation_prompt, **extra)
    assert ours == expected
    assert messages == before  # rendering does not touch the caller's messages


@pytest.mark.reference
def test_harmony_options_render_as_transformers_does() -> None:
    transformers = require_reference("transformers")
    template, bos, eos = TEMPLATES["gpt-oss"]
    options = {"reasoning_effort": "high", "builtin_tools": ["browser", "python"], "model_identity": "You are Orc."}
    messages = CONVERSATIONS["system"]
    expected = _hf_render(transformers, template, bos, eos, messages, add_generation_prompt=True, tools=TOOLS,
                          **options)
    assert ChatTemplate.from_string(template, bos, eos).render(messages, tools=TOOLS, **options) == expected
    assert "Reasoning: high" in expected and "namespace browser" in expected


def test_known_prompt_shapes() -> None:
    msgs = CONVERSATIONS["single"]
    qwen = ChatTemplate.from_string(*TEMPLATES["qwen2.5"]).render(msgs)
    assert qwen == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                    "<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    phi3 = ChatTemplate.from_string(*TEMPLATES["phi-3"]).render(msgs)
    assert phi3 == "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n"
    harmony = ChatTemplate.from_string(*TEMPLATES["gpt-oss"]).render(msgs, strftime_now=lambda fmt: "2025-08-05")
    assert harmony.startswith("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
                              "Knowledge cutoff: 2024-06\nCurrent date: 2025-08-05\n\nReasoning: medium\n\n")
    assert harmony.endswith("<|end|><|start|>user<|message|>What is 2+2?<|end|><|start|>assistant")


@pytest.mark.parametrize("name,stops", [("qwen2.5", ["<|im_end|>"]), ("phi-3", ["<|end|>", "<|endoftext|>"]),
                                        ("gpt-oss", ["<|return|>", "<|call|>"])])
def test_stop_tokens(name: str, stops: list[str]) -> None:
    assert ChatTemplate.from_string(*TEMPLATES[name]).stop_tokens == stops


@pytest.mark.parametrize("kind,stops", [("qwen2", ["<|im_end|>"]), ("phi3", ["<|end|>", "<|endoftext|>"]),
                                        ("gpt-oss", ["<|return|>", "<|call|>"])])
def test_from_gguf_reads_template_and_special_token_texts(tmp_path: Path, kind: str, stops: list[str]) -> None:
    path = write_vocab_gguf(tmp_path / "m.gguf", KINDS[kind])
    mf = ModelFile.open(path)
    chat = ChatTemplate.from_gguf(mf)
    assert chat.source == mf.require("tokenizer.chat_template")
    assert (chat.bos_token, chat.eos_token) == (KINDS[kind].special["bos"], KINDS[kind].special["eos"])
    assert chat.stop_tokens == stops
    tok = Tokenizer.from_gguf(mf)  # every stop text is an end-of-generation token of the vocabulary
    assert {tok.token_to_id(t) for t in stops} <= tok.eot_ids


def test_missing_template_is_a_clear_error(tmp_path: Path) -> None:
    kind = KINDS["gpt-2"]  # no chat template
    mf = ModelFile.open(write_vocab_gguf(tmp_path / "m.gguf", kind))
    with pytest.raises(ModelFileError, match="no chat template") as e:
        ChatTemplate.from_gguf(mf)
    assert e.value.context["key"] == "tokenizer.chat_template"


@pytest.mark.reference
@pytest.mark.parametrize("kind", ["qwen2", "phi3-named", "gpt-oss"])
def test_rendered_prompt_tokenizes_as_llama_cpp(tmp_path: Path, kind: str) -> None:
    llama_cpp = require_reference("llama_cpp")
    path = write_vocab_gguf(tmp_path / "m.gguf", KINDS[kind])
    mf = ModelFile.open(path)
    prompt = ChatTemplate.from_gguf(mf).render(CONVERSATIONS["system"], tools=TOOLS)
    ref = LlamaVocab(llama_cpp, path)
    try:
        assert Tokenizer.from_gguf(mf).encode(prompt) == ref.tokenize(prompt, True, True)
    finally:
        ref.close()


# --- the sandbox -----------------------------------------------------------------------------------------------------
HOSTILE = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ self.__init__.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ '{0.__class__}'.format('') }}",
    "{% set x = messages.append({'role': 'system'}) %}",
    "{{ (messages | first).update({'role': 'system'}) }}",
    "{{ 'x' * 100000000 }}",
    "{{ 10 ** 100000000 }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "{% for i in range(100) %}{{ 'y' * 1000000 }}{% endfor %}",
]


@pytest.mark.parametrize("source", HOSTILE)
def test_hostile_templates_raise_an_orcd_error(source: str) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ModelFileError, match="chat template") as e:
        ChatTemplate.from_string(source).render(messages)
    assert e.value.context["key"] == "tokenizer.chat_template"
    assert messages == [{"role": "user", "content": "hi"}]


def test_syntax_error_is_reported_with_its_line() -> None:
    with pytest.raises(ModelFileError, match="line 2"):
        ChatTemplate.from_string("ok\n{% for %}")


def test_template_rejections_are_invalid_requests() -> None:
    with pytest.raises(InvalidRequest, match="roles must alternate") as e:
        ChatTemplate.from_string("{{ raise_exception('roles must alternate') }}").render([])
    assert e.value.field == "messages"
    with pytest.raises(InvalidRequest, match="cannot render"):
        ChatTemplate.from_string(QWEN2_5_INSTRUCT).render([])  # messages[0] of nothing
    with pytest.raises(InvalidRequest, match="messages must be a list"):
        ChatTemplate.from_string(QWEN2_5_INSTRUCT).render("hello")  # type: ignore[arg-type]


def test_safe_features_templates_use_still_work() -> None:
    source = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
              "{% set ns.n = ns.n + 1 %}{{ m.content | tojson }}{% generation %}|{% endgeneration %}{% endfor %}"
              "{{ ns.n }}{{ messages | length }}{{ range(3) | list }}{{ 'ab' * 2 }}")
    out = ChatTemplate.from_string(source).render(
        [{"role": "user", "content": "<é>"}, {"role": "skip", "content": "x"}, {"role": "user", "content": "z"}])
    assert out == '"<é>"|"z"|23[0, 1, 2]abab'


# --- harmony ---------------------------------------------------------------------------------------------------------
def test_split_harmony_channels() -> None:
    done = split_harmony_channels(
        "<|channel|>analysis<|message|>User wants 2+2.<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>")
    assert done == {"analysis": "User wants 2+2.", "commentary": "", "final": "4", "tool_calls": []}
    call = split_harmony_channels(
        "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant to=functions.get_weather"
        "<|channel|>commentary <|constrain|>json<|message|>{\"city\": \"Paris\"}<|call|>")
    assert call["analysis"] == "Need the weather." and call["final"] == ""
    assert call["tool_calls"] == [{"recipient": "functions.get_weather", "content_type": "json",
                                   "arguments": '{"city": "Paris"}'}]
    recipient_after_channel = split_harmony_channels(
        "<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}<|call|>")
    assert recipient_after_channel["tool_calls"][0]["recipient"] == "functions.f"
    unfinished = split_harmony_channels("<|channel|>analysis<|message|>Thinking about it")
    assert unfinished["analysis"] == "Thinking about it" and unfinished["final"] == ""
    assert split_harmony_channels("plain answer") == {"analysis": "", "commentary": "", "final": "plain answer",
                                                      "tool_calls": []}


def test_harmony_split_of_a_decoded_generation(tmp_path: Path) -> None:
    """Decoded with the vocabulary (llama.cpp renders the harmony structure tokens even without special=true)."""
    tok = Tokenizer.from_gguf(ModelFile.open(write_vocab_gguf(tmp_path / "h.gguf", KINDS["gpt-oss"])))
    generated = ("<|channel|>analysis<|message|>2+2 is 4.<|end|>"
                 "<|start|>assistant<|channel|>final<|message|>Four.<|return|>")
    ids = tok.encode(generated, add_special=False)
    assert ids[-1] in tok.eot_ids and tok.token_to_id("<|end|>") not in tok.eot_ids
    text = tok.decode(ids[:-1], skip_special=True)
    assert split_harmony_channels(text) == {"analysis": "2+2 is 4.", "commentary": "", "final": "Four.",
                                            "tool_calls": []}
