"""``--tokenizer PATH``: a Hugging Face tokenizer.json used instead of the GGUF's vocabulary, through the loader and
the commands, for every architecture (issue 5 point 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orcd.errors import ModelFileError
from orcd.loader import load_model, load_tokenizer
from orcd.modelfile import ModelFile
from orcd.tokenizer import Tokenizer

TEXT = "Hello, world! 123 <|im_end|> 你好 🙂"


@pytest.mark.parametrize("arch", ["qwen2", "phi3", "gpt-oss"])
def test_tokenizer_json_gives_the_gguf_ids(synth_model, plugins, tmp_path: Path, arch: str) -> None:
    path = synth_model(arch, "Q8_0")
    gguf_tok = Tokenizer.from_gguf(ModelFile.open(path))
    gguf_tok.save(tmp_path)
    loaded = load_model(path, "cpu", plugins, tokenizer_path=tmp_path / "tokenizer.json")
    assert loaded.tokenizer.encode(TEXT) == gguf_tok.encode(TEXT)
    assert loaded.tokenizer.eot_ids == gguf_tok.eot_ids


def test_tokenize_command_with_tokenizer_json(synth_model, tmp_path: Path) -> None:
    path = synth_model("qwen2", "Q8_0")
    Tokenizer.from_gguf(ModelFile.open(path)).save(tmp_path)
    run = lambda *extra: json.loads(subprocess.run(  # noqa: E731
        [sys.executable, "-m", "orcd.cli", "tokenize", "--model", str(path), *extra, TEXT],
        check=True, capture_output=True, text=True).stdout)
    assert run("--tokenizer", str(tmp_path)) == run()


def test_a_tokenizer_of_another_model_is_refused(synth_model, tmp_path: Path) -> None:
    big = Tokenizer.from_gguf(ModelFile.open(synth_model("gpt-oss", "Q8_0")))
    small = ModelFile.open(synth_model("qwen2", "Q8_0"))
    assert big.vocab_size > small.tensor("token_embd.weight").shape[0]  # the premise of this test
    big.save(tmp_path)
    with pytest.raises(ModelFileError, match="belongs to another model"):
        load_tokenizer(small, tmp_path)


@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_chat_rendering_gets_exactly_one_bos(synth_model, arch: str) -> None:
    """A template that writes BOS itself and a vocabulary that adds one must not give the model two."""
    tok = Tokenizer.from_gguf(ModelFile.open(synth_model(arch, "Q8_0")))
    body = "<|user|>\nhi<|end|>\n"
    bos_text = tok.token_text(tok.bos_id)
    with_bos = tok.encode_chat(bos_text + body)
    without = tok.encode_chat(body)
    assert with_bos.count(tok.bos_id) == 1
    assert without.count(tok.bos_id) == (1 if tok.add_bos else 0)
