"""Round trips, streaming decode, the tokenizer.json backend against the GGUF one (and against transformers loading
the same files), bad vocabulary metadata, and the synthetic vocabulary writer."""

from __future__ import annotations

import time
from pathlib import Path

import gguf
import pytest

from conftest import require_reference
from orcd.arch import SynthSpec
from orcd.errors import ModelFileError
from orcd.modelfile import ModelFile
from orcd.testing.vocab import build_vocabulary, harmony_added_tokens
from orcd.tokenizer import StreamDecoder, Tokenizer
from tokenizer_support import CORPUS, KINDS, write_vocab_gguf

SPECIAL_TEXT = ("<|", "<s>", "</s>", "<unk>", "<tool_call>", "</tool_call>")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tokenizer]:
    d = tmp_path_factory.mktemp("vocab")
    return {name: Tokenizer.from_gguf(ModelFile.open(write_vocab_gguf(d / f"{name}.gguf", kind)))
            for name, kind in KINDS.items()}


@pytest.mark.parametrize("kind", list(KINDS))
def test_decode_inverts_encode(tokenizers, kind: str) -> None:
    tok = tokenizers[kind]
    for text in CORPUS:
        if any(s in text for s in SPECIAL_TEXT) and tok.hf.normalizer is not None:
            continue  # SentencePiece puts a space after each special token: not text-preserving, by design
        ids = tok.encode(text, add_special=False, parse_special=False)
        assert tok.decode(ids) == text
        assert tok.decode(tok.encode(text, parse_special=False), skip_special=True) == text  # BOS/EOS hidden


def test_decomposed_accents_are_not_normalized(tokenizers) -> None:
    """No NFC, as in llama.cpp: e + U+0301 stays two code points."""
    for tok in tokenizers.values():
        assert tok.decode(tok.encode("e\u0301", add_special=False)) == "e\u0301"


def _stream(tok: Tokenizer, ids: list[int], context: list[int] = (), start_of_text: bool = True) -> list[str]:
    decoder = StreamDecoder(tok, context=context, start_of_text=start_of_text)
    return [decoder.feed(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("kind", ["qwen2", "phi3", "gpt-oss"])
def test_stream_decoder_never_emits_a_broken_character(tokenizers, kind: str) -> None:
    tok = tokenizers[kind]
    text = "Hi 😀🚀 中文字 👨\u200d👩\u200d👧 done Привет é"
    ids = tok.encode(text, add_special=False)
    chunks = _stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == text
    assert all("\ufffd" not in c for c in chunks)
    # some character really was split across byte tokens, and its first bytes produced no text
    partial = [i for i in ids if tok.token_bytes(i) and not _is_complete_utf8(tok.token_bytes(i))]
    assert partial and "" in chunks[:-1]


def _is_complete_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_stream_decoder_holds_back_byte_fallback_until_the_last_byte(tokenizers) -> None:
    tok = tokenizers["phi3"]  # 龍 is not in the SentencePiece alphabet: three <0xNN> tokens
    ids = tok.encode("龍", add_special=False)
    assert [tok.token_text(i) for i in ids][-3:] == ["<0xE9>", "<0xBE>", "<0x8D>"]
    assert _stream(tok, ids[-3:]) == ["", "", "龍", ""]
    unfinished = StreamDecoder(tok)
    assert unfinished.feed(ids[-3]) == "" and unfinished.flush() == "\ufffd"


@pytest.mark.parametrize("kind", ["phi3", "qwen2"])
def test_stream_decoder_continues_a_prompt(tokenizers, tmp_path: Path, kind: str) -> None:
    """A stream continues a prompt: the first token's leading space is text, in both backends."""
    tok = tokenizers[kind]
    tok.save(tmp_path)
    loaded = Tokenizer.from_file(tmp_path)
    full = tok.encode("Hello world again", add_special=False)
    cut = next(i for i in range(len(full)) if tok.decode(full[:i]) == "Hello")
    prompt, ids = full[:cut], full[cut:]
    for t in (tok, loaded):
        assert "".join(_stream(t, ids, start_of_text=False)) == " world again"
        assert "".join(_stream(t, ids, context=prompt, start_of_text=False)) == " world again"
        assert "".join(_stream(t, prompt + ids)) == "Hello world again"


def test_stream_decoder_can_hide_special_tokens(tokenizers) -> None:
    tok = tokenizers["qwen2"]
    ids = tok.encode("<|im_start|>assistant\nHi<|im_end|>", add_special=False)
    d = StreamDecoder(tok, skip_special=True)
    assert "".join(d.feed(i) for i in ids) + d.flush() == "assistant\nHi"


@pytest.mark.parametrize("kind", list(KINDS))
def test_tokenizer_json_backend_gives_the_same_ids(tokenizers, tmp_path: Path, kind: str) -> None:
    tok = tokenizers[kind]
    tok.save(tmp_path)
    loaded = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert (loaded.bos_id, loaded.eos_id, loaded.add_bos, loaded.add_eos) == (tok.bos_id, tok.eos_id, tok.add_bos,
                                                                            tok.add_eos)
    assert loaded.vocab_size == tok.vocab_size and loaded.eot_ids == tok.eot_ids
    for text in CORPUS:
        for add_special in (False, True):
            for parse_special in (True, False):
                if kind == "phi3-named" and "\u3000" in text:
                    continue  # tokenizers' rstrip also swallows Unicode spaces, llama.cpp's only ASCII ones
                assert loaded.encode(text, add_special, parse_special) == tok.encode(text, add_special, parse_special)
        ids = tok.encode(text)
        assert loaded.decode(ids) == tok.decode(ids)
        assert "".join(_stream(loaded, ids)) == "".join(_stream(tok, ids))


@pytest.mark.parametrize("kind", ["qwen2", "phi3", "gpt-oss"])
def test_transformers_loads_the_saved_tokenizer_to_the_same_ids(tokenizers, tmp_path: Path, kind: str) -> None:
    transformers = require_reference("transformers")
    tok = tokenizers[kind]
    tok.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    for text in CORPUS:
        assert hf(text)["input_ids"] == tok.encode(text), text


def test_from_file_takes_bos_eos_from_the_gguf_when_no_config(tokenizers, tmp_path: Path) -> None:
    tok = tokenizers["qwen2"]
    tok.hf.save(str(tmp_path / "tokenizer.json"))  # tokenizer.json alone
    path = write_vocab_gguf(tmp_path / "model.gguf", KINDS["qwen2"])
    loaded = Tokenizer.from_file(tmp_path / "tokenizer.json", model=ModelFile.open(path))
    assert (loaded.bos_id, loaded.eos_id) == (tok.bos_id, tok.eos_id)
    assert loaded.eot_ids == tok.eot_ids


# --- bad input -------------------------------------------------------------------------------------------------------
def _metadata(kind: str) -> dict:
    k = KINDS[kind]
    v = build_vocabulary(k.tokenizer, k.pre, k.vocab_size, tuple(k.special.items()), tuple(k.extra))
    meta = {"tokenizer.ggml.model": v.model, "tokenizer.ggml.pre": v.pre, "tokenizer.ggml.tokens": list(v.tokens),
            "tokenizer.ggml.token_type": list(v.types)}
    if v.scores:
        meta["tokenizer.ggml.scores"] = list(v.scores)
    if v.merges:
        meta["tokenizer.ggml.merges"] = list(v.merges)
    for role, i in v.special_ids.items():
        meta[{"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
              "eot": "tokenizer.ggml.eot_token_id", "pad": "tokenizer.ggml.padding_token_id",
              "unk": "tokenizer.ggml.unknown_token_id"}[role]] = i
    return meta


def test_metadata_builds_the_same_tokenizer_as_the_file(tokenizers) -> None:
    assert Tokenizer.from_metadata(_metadata("qwen2")).encode(CORPUS[15]) == tokenizers["qwen2"].encode(CORPUS[15])


@pytest.mark.parametrize("kind,change,key", [
    ("qwen2", lambda m: m.pop("tokenizer.ggml.model"), "tokenizer.ggml.model"),
    ("qwen2", lambda m: m.update({"tokenizer.ggml.model": "bert"}), "tokenizer.ggml.model"),
    ("qwen2", lambda m: m.pop("tokenizer.ggml.tokens"), "tokenizer.ggml.tokens"),
    ("qwen2", lambda m: m.update({"tokenizer.ggml.tokens": []}), "tokenizer.ggml.tokens"),
    ("qwen2", lambda m: m["tokenizer.ggml.token_type"].pop(), "tokenizer.ggml.token_type"),
    ("qwen2", lambda m: m["tokenizer.ggml.token_type"].__setitem__(3, 42), "tokenizer.ggml.token_type"),
    ("qwen2", lambda m: m.pop("tokenizer.ggml.merges"), "tokenizer.ggml.merges"),
    ("qwen2", lambda m: m["tokenizer.ggml.merges"].__setitem__(5, "nospace"), "tokenizer.ggml.merges"),
    ("qwen2", lambda m: m["tokenizer.ggml.merges"].__setitem__(5, "Ġthe zzzq"), "tokenizer.ggml.merges"),
    ("qwen2", lambda m: m.update({"tokenizer.ggml.pre": "klingon"}), "tokenizer.ggml.pre"),
    ("qwen2", lambda m: m.update({"tokenizer.ggml.eos_token_id": 10**6}), "tokenizer.ggml.eos_token_id"),
    ("qwen2", lambda m: (m.pop("tokenizer.ggml.bos_token_id"), m.update({"tokenizer.ggml.add_bos_token": True})),
     "tokenizer.ggml.bos_token_id"),
    ("phi3", lambda m: m.pop("tokenizer.ggml.scores"), "tokenizer.ggml.scores"),
    ("phi3", lambda m: m["tokenizer.ggml.scores"].pop(), "tokenizer.ggml.scores"),
    ("phi3", lambda m: m["tokenizer.ggml.tokens"].__setitem__(3, "<0xZZ>"), "tokenizer.ggml.tokens"),
])
def test_bad_vocabulary_metadata_names_the_key(kind: str, change, key: str) -> None:
    meta = _metadata(kind)
    change(meta)
    with pytest.raises(ModelFileError) as e:
        Tokenizer.from_metadata(meta, source="model.gguf")
    assert e.value.context.get("key") == key and key in e.value.message and "model.gguf" in e.value.message


def test_a_gguf_without_vocabulary_is_a_clear_error(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(tmp_path / "bare.gguf", "qwen2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with pytest.raises(ModelFileError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf(ModelFile.open(tmp_path / "bare.gguf"))


def test_from_file_rejects_a_missing_or_broken_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="no such tokenizer file"):
        Tokenizer.from_file(tmp_path / "nope.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="not a Hugging Face tokenizer.json"):
        Tokenizer.from_file(tmp_path)


def test_ids_outside_the_vocabulary_are_rejected(tokenizers) -> None:
    tok = tokenizers["qwen2"]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        StreamDecoder(tok).feed(-1)


# --- the synthetic vocabulary writer ---------------------------------------------------------------------------------
@pytest.mark.parametrize("model,pre,size,special,extra", [
    ("gpt2", "qwen2", 512, KINDS["qwen2"].special, KINDS["qwen2"].extra),
    ("gpt2", "qwen2", 151_936, KINDS["qwen2"].special, KINDS["qwen2"].extra),
    ("gpt2", "gpt-4o", 201_088, KINDS["gpt-oss"].special, harmony_added_tokens(full=True)),
    ("llama", "default", 512, KINDS["phi3"].special, KINDS["phi3"].extra),
    ("llama", "default", 32_064, KINDS["phi3"].special, KINDS["phi3"].extra),
])
def test_synthetic_vocabularies_have_the_exact_size_and_layout(model, pre, size, special, extra) -> None:
    build_vocabulary.cache_clear()
    started = time.monotonic()
    v = build_vocabulary(model, pre, size, tuple(special.items()), tuple(extra))
    assert time.monotonic() - started < 10  # about 1 s for 201,088 tokens here
    assert len(v.tokens) == len(set(v.tokens)) == len(v.types) == size
    for role, text in special.items():
        assert v.tokens[v.special_ids[role]] == text
    if model == "gpt2":
        assert len(v.tokens[0]) == 1 and len(v.merges) == size - 256 - len(set(special.values()) | set(extra))
        known = set(v.tokens)
        assert all(a in known and b in known and a + b in known for a, b in (m.split(" ") for m in v.merges))
    else:
        assert v.tokens[:3] == ("<unk>", "<s>", "</s>") and v.tokens[3] == "<0x00>" and v.tokens[258] == "<0xFF>"
        normal = [s for s, t in zip(v.scores, v.types) if t == gguf.TokenType.NORMAL]
        assert normal == sorted(normal, reverse=True) and len(set(normal)) == len(normal)
    if size == 201_088:  # GPT-OSS's layout: 199,998 BPE tokens, then the harmony tokens at their real ids
        assert v.tokens[199_998] == "<|startoftext|>" and v.tokens[200_002] == "<|return|>"
        assert v.tokens[200_012] == "<|call|>" and v.tokens[-1] == "<|reserved_201087|>"


def test_writer_keeps_flags_the_spec_sets_and_resolves_template_names(tmp_path: Path) -> None:
    k = KINDS["phi3-named"]  # metadata sets add_bos_token true; the template is named "phi-3"
    path = write_vocab_gguf(tmp_path / "p.gguf", k)
    mf = ModelFile.open(path)
    assert mf.require("tokenizer.ggml.add_bos_token") is True
    assert "<|assistant|>" in mf.require("tokenizer.chat_template")
    with pytest.raises(ValueError, match="unknown chat template name"):
        write_vocab_gguf(tmp_path / "x.gguf", type(k)(**{**k.__dict__, "chat_template": "no-such-template"}))


def test_writer_rejects_impossible_specs() -> None:
    with pytest.raises(ValueError, match="at least 256"):
        build_vocabulary("gpt2", "qwen2", 200, (("eos", "<|im_end|>"),))
    with pytest.raises(ValueError, match="not GGUF roles"):
        build_vocabulary("gpt2", "qwen2", 512, (("boss", "<|im_end|>"),))
    with pytest.raises(ValueError, match="'gpt2' or 'llama'"):
        build_vocabulary("bert", None, 512, ())
    with pytest.raises(ValueError, match="tokenizer_pre"):
        build_vocabulary("gpt2", "klingon", 512, ())


def test_synth_spec_is_what_write_tokenizer_reads() -> None:
    spec = SynthSpec(metadata={}, tensors=[], tokenizer="gpt2", tokenizer_pre="qwen2", vocab_size=512,
                     special_tokens={"eos": "<|im_end|>"}, extra_special_tokens=["<|im_start|>"])
    v = build_vocabulary(spec.tokenizer, spec.tokenizer_pre, spec.vocab_size, tuple(spec.special_tokens.items()),
                         tuple(spec.extra_special_tokens))
    assert v.tokens[-2:] == ("<|im_end|>", "<|im_start|>") and v.special_ids == {"eos": 510}
