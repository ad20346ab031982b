"""The GGUF tokenizer against llama.cpp's (token ids, decoded text, token pieces, end-of-generation set, BOS/EOS),
on vocabularies written by orcd.testing.vocab: byte-level BPE with the qwen2, gpt-4o (GPT-OSS), gpt-2 and default
pre-tokenizers, and SentencePiece (Phi-3) with and without llama.cpp's Phi-3 right-strip rule. Exact equality is
required: tokenization has no tolerance."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from conftest import require_reference
from orcd.modelfile import ModelFile
from orcd.tokenizer import Tokenizer
from tokenizer_support import CORPUS, FUZZ_POOL, KINDS, LlamaVocab, write_vocab_gguf

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def vocab_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("vocab")
    return {name: write_vocab_gguf(d / f"{name}.gguf", kind) for name, kind in KINDS.items()}


@pytest.fixture(scope="module")
def pair(vocab_files: dict[str, Path]):
    """``pair(kind)`` → (orcd Tokenizer, llama.cpp vocabulary) for one vocabulary file."""
    llama_cpp = require_reference("llama_cpp")
    opened: dict[str, tuple[Tokenizer, LlamaVocab]] = {}

    def get(kind: str) -> tuple[Tokenizer, LlamaVocab]:
        if kind not in opened:
            path = vocab_files[kind]
            opened[kind] = (Tokenizer.from_gguf(ModelFile.open(path)), LlamaVocab(llama_cpp, path))
        return opened[kind]

    yield get
    for _, ref in opened.values():
        ref.close()


def _show(tok: Tokenizer, ids: list[int]) -> list[str]:
    return [tok.token_text(i) for i in ids]


@pytest.mark.parametrize("kind", list(KINDS))
def test_token_ids_equal_llama_cpp_on_the_corpus(pair, kind: str) -> None:
    tok, ref = pair(kind)
    for text in CORPUS:
        for add_special in (False, True):
            for parse_special in (True, False):
                ours = tok.encode(text, add_special=add_special, parse_special=parse_special)
                theirs = ref.tokenize(text, add_special, parse_special)
                assert ours == theirs, (text, add_special, parse_special, _show(tok, ours), _show(tok, theirs))


@pytest.mark.parametrize("kind", list(KINDS))
def test_token_ids_equal_llama_cpp_on_random_text(pair, kind: str) -> None:
    """Seeded random strings over letters, digits, whitespace, CJK, emoji, combining marks, Unicode spaces and
    special-token text: the corner cases meet each other."""
    tok, ref = pair(kind)
    rng = random.Random(kind)
    for _ in range(1500):
        text = "".join(rng.choice(FUZZ_POOL) for _ in range(rng.randint(1, 40)))
        for add_special, parse_special in ((False, True), (True, False)):
            ours = tok.encode(text, add_special=add_special, parse_special=parse_special)
            assert ours == ref.tokenize(text, add_special, parse_special), (text, _show(tok, ours))


@pytest.mark.parametrize("kind", ["qwen2", "phi3", "phi3-named", "gpt-oss"])
def test_decode_equals_llama_cpp_detokenize(pair, kind: str) -> None:
    """(gpt-2 and default vocabularies are left out: llama.cpp's detokenizer "cleans" their spaces, dropping the one
    before ?!., — lossy, and orcd does not copy it.)"""
    tok, ref = pair(kind)
    for text in CORPUS:
        ids = ref.tokenize(text, False, True)
        assert tok.decode(ids).encode("utf-8", "surrogatepass") == ref.detokenize(ids), text


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_token_piece_eog_and_bos_eos_match_llama_cpp(pair, kind: str) -> None:
    tok, ref = pair(kind)
    assert tok.vocab_size == ref.n_vocab == KINDS[kind].vocab_size
    assert [tok.token_bytes(i) for i in range(tok.vocab_size)] == [ref.piece(i) for i in range(ref.n_vocab)]
    assert tok.eot_ids == {i for i in range(ref.n_vocab) if ref.is_eog(i)}
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (ref.bos, ref.eos, ref.add_bos)


def test_end_of_turn_tokens_of_each_family(pair) -> None:
    texts = {}
    for kind in ("qwen2", "phi3", "gpt-oss"):
        tok, _ = pair(kind)
        texts[kind] = {tok.token_text(i) for i in tok.eot_ids}
    assert {"<|im_end|>", "<|endoftext|>"} <= texts["qwen2"]
    assert {"<|end|>", "<|endoftext|>"} <= texts["phi3"]
    # harmony: <|end|> closes a message, the turn ends with <|return|> or <|call|>
    assert {"<|return|>", "<|call|>"} <= texts["gpt-oss"] and "<|end|>" not in texts["gpt-oss"]


def test_phi3_special_tokens_strip_ascii_whitespace_only(pair) -> None:
    """llama.cpp strips the whitespace after Phi-3's special tokens with isspace (ASCII); a U+3000 stays text."""
    tok, _ = pair("phi3-named")
    assert tok.encode("<|user|>\n  Hi", add_special=False) == tok.encode("<|user|>Hi", add_special=False)
    assert tok.encode("<|user|>\u3000Hi", add_special=False) != tok.encode("<|user|>Hi", add_special=False)
    plain, _ = pair("phi3")  # general.name without Phi-3: no strip
    assert plain.encode("<|user|>\nHi", add_special=False) != plain.encode("<|user|>Hi", add_special=False)


@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_synthetic_models_tokenize_as_llama_cpp(synth_model, arch: str) -> None:
    """The vocabulary inside the tiny synthetic model files the other tests run."""
    llama_cpp = require_reference("llama_cpp")
    path = synth_model(arch, "Q8_0")
    tok, ref = Tokenizer.from_gguf(ModelFile.open(path)), LlamaVocab(llama_cpp, path)
    try:
        assert tok.vocab_size == ref.n_vocab
        for text in CORPUS:
            assert tok.encode(text) == ref.tokenize(text, True, True), text
            assert tok.encode(text, parse_special=False) == ref.tokenize(text, True, False), text
        assert tok.eot_ids == {i for i in range(ref.n_vocab) if ref.is_eog(i)}
    finally:
        ref.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind,vocab_size", [("qwen2", 151_936), ("gpt-oss", 201_088), ("phi3-named", 32_064)])
def test_real_size_vocabularies_tokenize_as_llama_cpp(tmp_path: Path, kind: str, vocab_size: int) -> None:
    """Qwen2.5's, GPT-OSS's and Phi-3's vocabulary sizes: mostly systematic merges, which fire on the corpus."""
    llama_cpp = require_reference("llama_cpp")
    path = write_vocab_gguf(tmp_path / f"{kind}.gguf", KINDS[kind], vocab_size)
    tok, ref = Tokenizer.from_gguf(ModelFile.open(path)), LlamaVocab(llama_cpp, path)
    try:
        assert tok.vocab_size == ref.n_vocab == vocab_size
        rng = random.Random(vocab_size)
        texts = CORPUS + ["".join(rng.choice(FUZZ_POOL) for _ in range(30)) for _ in range(300)]
        for text in texts:
            for parse_special in (True, False):
                assert tok.encode(text, parse_special=parse_special) == ref.tokenize(text, True, parse_special), text
        assert tok.eot_ids == {i for i in range(ref.n_vocab) if ref.is_eog(i)}
    finally:
        ref.close()
