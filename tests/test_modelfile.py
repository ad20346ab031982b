"""GGUF model files: the tensor table, metadata access, and one test per kind of bad input — each a ModelFileError
or QuantError with a message naming what is wrong, never a numpy or struct traceback."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from orcd.cli import main as cli
from orcd.description import describe, open_checked
from orcd.errors import ModelFileError, OrcdError, QuantError
from orcd.modelfile import ModelFile


def write_qwen2(path: Path, *, drop_key: str | None = None, drop_tensor: str | None = None,
                arch: str = "qwen2", odd_type: gguf.GGMLQuantizationType | None = None) -> Path:
    """A minimal one-layer qwen2 file written with gguf's own writer (F32 tensors, real names and keys)."""
    hidden, ffn, heads, kv, vocab = 64, 96, 4, 2, 32
    w = gguf.GGUFWriter(path, arch)
    keys = {
        f"{arch}.context_length": 128, f"{arch}.embedding_length": hidden, f"{arch}.block_count": 1,
        f"{arch}.feed_forward_length": ffn, f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": kv,
    }
    for k, v in keys.items():
        if k != drop_key:
            w.add_uint32(k, v)
    w.add_float32(f"{arch}.rope.freq_base", 1e6)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    hd = hidden // heads
    shapes = {
        "token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,),
        "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
        "blk.0.attn_q.weight": (heads * hd, hidden), "blk.0.attn_q.bias": (heads * hd,),
        "blk.0.attn_k.weight": (kv * hd, hidden), "blk.0.attn_k.bias": (kv * hd,),
        "blk.0.attn_v.weight": (kv * hd, hidden), "blk.0.attn_v.bias": (kv * hd,),
        "blk.0.attn_output.weight": (hidden, heads * hd),
        "blk.0.ffn_gate.weight": (ffn, hidden), "blk.0.ffn_up.weight": (ffn, hidden),
        "blk.0.ffn_down.weight": (hidden, ffn),
    }
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        if name == drop_tensor:
            continue
        data = rng.standard_normal(shape, dtype=np.float32)
        if odd_type is not None and name == "blk.0.ffn_up.weight":
            w.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), raw_dtype=odd_type)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return write_qwen2(tmp_path / "good.gguf")


def test_tensor_table_and_metadata(good: Path) -> None:
    model = ModelFile.open(good)
    assert model.architecture == "qwen2"
    assert model.arch_require("block_count") == 1
    info = model.tensor("blk.0.ffn_down.weight")
    assert (info.type_name, info.shape, info.n_bytes) == ("F32", (64, 96), 64 * 96 * 4)
    # Raw bytes are a view of the file: compare with gguf's own reader.
    ref = {t.name: t for t in gguf.GGUFReader(good).tensors}["blk.0.ffn_down.weight"]
    assert np.array_equal(model.raw(info.name).view(np.float32).reshape(info.shape), ref.data)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b'{"__metadata__": {}}' + bytes(100))
    with pytest.raises(ModelFileError, match=r"not a GGUF file \(it starts with b'\{\"__'"):
        ModelFile.open(bad)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="no such file"):
        ModelFile.open(tmp_path / "nope.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        ModelFile.open(tmp_path / "empty.gguf")


@pytest.mark.parametrize("keep", [8, 24, 200, 1000])
def test_truncated_header(good: Path, tmp_path: Path, keep: int) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:keep])
    with pytest.raises(ModelFileError, match=r"header is truncated or corrupt.*has %d bytes" % keep):
        ModelFile.open(cut)


def test_truncated_tensor_data(good: Path, tmp_path: Path) -> None:
    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelFileError, match=r"tensor 'blk.0.ffn_down.weight' data is out of bounds.*truncated"):
        ModelFile.open(cut)


def test_hostile_tensor_offset(good: Path, tmp_path: Path) -> None:
    """A tensor whose offset points far past the end of the file (a crafted file, not a truncated one)."""
    reader = gguf.GGUFReader(good)
    field = reader.tensors[0].field
    offset_part = field.parts[-1]  # the tensor's data offset, relative to the data section
    raw = bytearray(good.read_bytes())
    pos = field.offset + sum(p.nbytes for p in field.parts[:-1])
    raw[pos : pos + 8] = np.array([2**40], dtype=np.uint64).tobytes()
    assert offset_part.nbytes == 8
    hostile = tmp_path / "hostile.gguf"
    hostile.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match=rf"tensor '{reader.tensors[0].name}' data is out of bounds"):
        ModelFile.open(hostile)


def test_absurd_counts_in_header(good: Path, tmp_path: Path) -> None:
    raw = bytearray(good.read_bytes())
    raw[16:24] = np.array([2**62], dtype=np.uint64).tobytes()  # kv_count
    hostile = tmp_path / "hostile.gguf"
    hostile.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="header is truncated or corrupt"):
        ModelFile.open(hostile)


def test_architecture_without_plugin(tmp_path: Path, plugins) -> None:
    path = write_qwen2(tmp_path / "m.gguf", arch="mamba9")
    with pytest.raises(ModelFileError, match=r"architecture 'mamba9'.*installed architectures: .*qwen2"):
        open_checked(path, plugins)


def test_tensor_type_without_quant_plugin(tmp_path: Path, plugins) -> None:
    # IQ2_XXS is a real ggml type that no installed plugin decodes. Bytes come from a Q8_0 encoding; only the
    # declared type matters here, and the byte count must fit it for the file to be structurally valid.
    t = gguf.GGMLQuantizationType.IQ2_XXS
    bs, ts = gguf.GGML_QUANT_SIZES[t]
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((96, 256 // bs * ts), dtype=np.uint8), raw_dtype=t)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(QuantError, match=r"tensor 'blk.0.ffn_up.weight' has type IQ2_XXS.*install orcd-quant-formats"):
        open_checked(path, plugins)


@pytest.mark.parametrize("key", ["qwen2.block_count", "qwen2.embedding_length"])
def test_missing_metadata(tmp_path: Path, plugins, key: str) -> None:
    path = write_qwen2(tmp_path / "m.gguf", drop_key=key)
    with pytest.raises(ModelFileError, match=rf"required metadata key '{key}' is missing"):
        open_checked(path, plugins)


def test_missing_tensor(tmp_path: Path, plugins) -> None:
    path = write_qwen2(tmp_path / "m.gguf", drop_tensor="blk.0.attn_k.bias")
    with pytest.raises(ModelFileError, match=r"required tensor 'blk.0.attn_k.bias' is missing"):
        open_checked(path, plugins)


def test_describe(good: Path, plugins) -> None:
    d = describe(good, plugins)
    assert d.architecture == "qwen2" and d.file_type == "unknown"
    assert d.tensor_types == {"F32": 14}
    assert d.parameter_count == sum(int(np.prod(t.shape)) for t in gguf.GGUFReader(good).tensors)
    assert d.weights_bytes == 4 * d.parameter_count
    # K and V, 1 layer, 2 kv heads of 16, 128 positions, FP16
    assert d.kv_cache_bytes == 2 * 1 * 2 * 16 * 128 * 2
    assert d.estimated_gpu_bytes == d.weights_bytes + d.kv_cache_bytes
    assert d.vocab_size == 32 and d.context_length == 128 and not d.has_chat_template


def test_inspect_cli(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["inspect", str(good), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["architecture"] == "qwen2" and d["tensor_count"] == 14
    assert cli(["inspect", str(good)]) == 0
    out = capsys.readouterr().out
    assert "architecture" in out and "qwen2" in out and "estimated GPU memory" in out


def test_inspect_cli_bad_file_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + bytes(3))
    assert cli(["inspect", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("orcd inspect: error:") and "truncated or corrupt" in err and "\n" not in err


def test_every_bad_input_is_one_exception_family() -> None:
    assert issubclass(ModelFileError, OrcdError) and issubclass(QuantError, OrcdError)


def _vocab_file(path: Path, n_tokens: int, n_merges: int) -> Path:
    """A header with vocabulary arrays the size of a real tokenizer's (GPT-OSS: 201,088 tokens, 446,189 merges)."""
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_token_list([f"tok{i}_" + "é" * (i % 3) for i in range(n_tokens)])
    w.add_token_scores([i / n_tokens for i in range(n_tokens)])
    w.add_token_types([1 + i % 3 for i in range(n_tokens)])
    w.add_token_merges([f"a{i} b{i}" for i in range(n_merges)])
    w.add_array("test.bools", [True, False, True])
    w.add_array("test.empty", [])
    w.add_tensor("w", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_metadata_arrays_equal_the_gguf_readers(tmp_path: Path, synth_model) -> None:
    """The one-pass array reading gives, for every key, what gguf's own reader gives (field.contents())."""
    paths = [_vocab_file(tmp_path / "vocab.gguf", 20_000, 30_000), synth_model("qwen2", "Q4_K_M"),
             synth_model("phi3", "Q4_K_M"), synth_model("gpt-oss", "MXFP4")]
    for path in paths:
        ours = ModelFile.open(path).metadata
        reference = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}
        assert ours.keys() == reference.keys(), path
        for key, value in reference.items():
            assert ours[key] == value and type(ours[key]) is type(value), (path, key)


def test_truncated_vocabulary_array(tmp_path: Path) -> None:
    """A header cut inside the token strings, and one whose string count is absurd: the header error, not a hang."""
    data = _vocab_file(tmp_path / "vocab.gguf", 2_000, 0).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:20_000])  # past the count check (8 bytes a string), inside the strings
    with pytest.raises(ModelFileError, match=r"header is truncated or corrupt.*past the end of the file"):
        ModelFile.open(cut)
    at = data.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens") + 4 + 4  # value type, item type
    raw = bytearray(data)
    raw[at : at + 8] = np.array([2**61], dtype=np.uint64).tobytes()
    hostile = tmp_path / "hostile.gguf"
    hostile.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match=r"header is truncated or corrupt.*cannot fit"):
        ModelFile.open(hostile)


def test_bad_utf8_token_is_named_by_its_key(tmp_path: Path) -> None:
    data = bytearray(_vocab_file(tmp_path / "vocab.gguf", 100, 0).read_bytes())
    at = data.index(b"tok50_")
    data[at : at + 2] = b"\xff\xfe"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"metadata key 'tokenizer.ggml.tokens' cannot be decoded"):
        ModelFile.open(bad).metadata
