"""Shared by the tokenizer and chat tests: llama.cpp's tokenizer through its C API (vocab-only load, no context),
vocabulary-only GGUF files written with orcd.testing.vocab, the vocabulary kinds and the test corpus."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import gguf

from orcd.arch import SynthSpec
from orcd.testing.vocab import HARMONY_SPECIAL_TOKENS, harmony_added_tokens, write_tokenizer

QWEN_SPECIAL = {"bos": "<|endoftext|>", "eos": "<|im_end|>", "eot": "<|im_end|>", "pad": "<|endoftext|>"}
QWEN_EXTRA = ["<|im_start|>", "<|object_ref_start|>", "<|object_ref_end|>", "<tool_call>", "</tool_call>",
              "<|fim_prefix|>", "<|fim_pad|>", "<|file_sep|>"]
PHI3_SPECIAL = {"bos": "<s>", "eos": "<|endoftext|>", "eot": "<|end|>", "unk": "<unk>", "pad": "<|endoftext|>"}
PHI3_EXTRA = ["<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>", "<|placeholder4|>",
              "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]


@dataclass(frozen=True)
class Kind:
    """A vocabulary to test: tokenizer model and pre-tokenizer, size, special tokens, general.name, flags."""

    name: str
    arch: str
    tokenizer: str
    pre: str
    vocab_size: int
    special: dict[str, str]
    extra: list[str]
    model_name: str = "synthetic"
    metadata: dict[str, bool] = field(default_factory=dict)
    chat_template: str | None = None


KINDS = {
    "qwen2": Kind("qwen2", "qwen2", "gpt2", "qwen2", 2000, QWEN_SPECIAL, QWEN_EXTRA, chat_template="qwen2.5"),
    "phi3": Kind("phi3", "phi3", "llama", "default", 2000, PHI3_SPECIAL, PHI3_EXTRA, chat_template="phi-3"),
    # general.name with "phi-3" turns on llama.cpp's right-strip of special tokens; BOS added here
    "phi3-named": Kind("phi3-named", "phi3", "llama", "default", 2000, PHI3_SPECIAL, PHI3_EXTRA,
                       model_name="Phi-3 mini synthetic", metadata={"tokenizer.ggml.add_bos_token": True},
                       chat_template="phi-3"),
    "gpt-oss": Kind("gpt-oss", "qwen2", "gpt2", "gpt-4o", 3000, HARMONY_SPECIAL_TOKENS,
                    harmony_added_tokens(), chat_template="gpt-oss"),
    "gpt-2": Kind("gpt-2", "qwen2", "gpt2", "gpt-2", 1000, QWEN_SPECIAL, QWEN_EXTRA),
    "default": Kind("default", "qwen2", "gpt2", "default", 1000, QWEN_SPECIAL, QWEN_EXTRA),
}


def write_vocab_gguf(path: Path, kind: Kind, vocab_size: int | None = None) -> Path:
    """A GGUF file holding a vocabulary and the hyper-parameters llama.cpp's loader reads, no tensors (enough for
    a vocab_only load)."""
    spec = SynthSpec(metadata=dict(kind.metadata), tensors=[], tokenizer=kind.tokenizer, tokenizer_pre=kind.pre,
                     vocab_size=vocab_size or kind.vocab_size, chat_template=kind.chat_template,
                     special_tokens=dict(kind.special), extra_special_tokens=list(kind.extra))
    w = gguf.GGUFWriter(path, kind.arch)
    w.add_name(kind.model_name)
    w.add_context_length(4096)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    for key, value in kind.metadata.items():
        w.add_bool(key, value)
    write_tokenizer(w, spec)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


class LlamaVocab:
    """llama.cpp's tokenizer for a GGUF file (llama_tokenize / llama_detokenize / llama_token_to_piece)."""

    def __init__(self, llama_cpp: ModuleType, path: Path) -> None:
        self.lib = llama_cpp
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        assert self.model, f"llama.cpp cannot load {path}"
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        n = len(data) + 8
        buf = (self.lib.llama_token * n)()
        count = self.lib.llama_tokenize(self.vocab, data, len(data), buf, n, add_special, parse_special)
        assert count >= 0, f"llama_tokenize needs {-count} tokens"
        return list(buf[:count])

    def detokenize(self, ids: list[int], unparse_special: bool = True) -> bytes:
        arr = (self.lib.llama_token * max(1, len(ids)))(*ids)
        n = 64 + 64 * len(ids)
        out = ctypes.create_string_buffer(n)
        count = self.lib.llama_detokenize(self.vocab, arr, len(ids), out, n, False, unparse_special)
        assert count >= 0
        return out.raw[:count]

    def piece(self, token_id: int, special: bool = True) -> bytes:
        buf = ctypes.create_string_buffer(512)
        count = self.lib.llama_token_to_piece(self.vocab, token_id, buf, 512, 0, special)
        assert count >= 0
        return buf.raw[:count]

    def is_eog(self, token_id: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token_id))

    @property
    def bos(self) -> int:
        return self.lib.llama_vocab_bos(self.vocab)

    @property
    def eos(self) -> int:
        return self.lib.llama_vocab_eos(self.vocab)

    @property
    def add_bos(self) -> bool:
        return bool(self.lib.llama_vocab_get_add_bos(self.vocab))

    def close(self) -> None:
        self.lib.llama_model_free(self.model)


# Whitespace runs, digits, code, CJK, emoji, combining marks, mixed case outside ASCII, special-token text.
CORPUS = [
    "Hello world", " Hello world", "  leading spaces", "trailing spaces   ", "a  b   c    d\t\te",
    "\n\nnewlines\n\n\n", "line one\r\nline two\rline three", "tabs\tand\tmore\t\t\ttabs", "   \n  \n", " ", "",
    "\t", "\n", "12345 678 9,000,000.25 3.14159 0x1F 1e-10 007", "Numbers: 1 22 333 4444 55555 666666",
    "def f(x):\n    return x ** 2  # square\n\nclass A:\n    pass\n", "if (a <= b && c != d) { x += 1; } // done",
    'print(f"{name!r:>10}")', "<div id='x'>text</div>", "SELECT * FROM t WHERE a='b';",
    "I'm, you're, he's, we've, they'll, I'd, DON'T, WE'RE, It'S",
    "\u2019curly quotes\u2019 \u201cdouble\u201d \u2014 dash",
    "你好，世界！这是一个测试。", "日本語のテキスト、東京", "한국어 문장입니다", "Привет, мир!", "Ελληνικά γράμματα",
    "emoji 😀🚀👍🏽❤️🎉🇫🇷 end", "👨\u200d👩\u200d👧\u200d👦 family", "mixed 中文english混合123",
    "e\u0301 combining acute, a\u0308 o\u0303 n\u0303", "Café naïve Zürich ÅNGSTRÖM straße", "ǅemo Ǆ ǆ", "aÉb ÉÉa Éa",
    "ﬁ ligature ﬀ", "\u00a0nbsp\u00a0here", "zero\u200bwidth\u200djoiner", "ideographic\u3000space",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "text<|endoftext|>more", "<|im_end|><|im_end|>",
    '<tool_call>{"a": 1}</tool_call>', "<s>bos in text</s> and <unk>", "<|user|>\nQuestion?<|end|>\n<|assistant|>\n",
    "<|user|> spaced <|end|>  \n x", "<|user|>\u3000wide space",
    "<|start|>assistant<|channel|>analysis<|message|>think<|end|>"
    "<|start|>assistant<|channel|>final<|message|>Hi<|return|>",
    "<|call|>", "< |im_end| >", "<|im_end", "|>", "The quick brown fox jumps over the lazy dog. " * 5, "x" * 100,
    "ab" * 50, "!!!???...,,,;;;:::", "@#$%^&*()_+-=[]{}|\\;':\",./<>?~`", "\u0000 nul and \u001b escape",
    "\ufffd replacement", "𝕳𝖊𝖑𝖑𝖔 math letters", "١٢٣ arabic digits ٤٥٦", "https://example.com/path?query=1&b=2#frag",
    "C:\\Users\\name\\file.txt", "'s 'S 're 'RE n't", "  'll", "...\n\n\n...",
]
FUZZ_POOL = [
    *"aAbBzZ eE  \t\n\r0123456789'\".,!?-_/<>|()[]{}#@:;", *"éÉüßñçøåÆœ中文字日本한국Привет",
    "😀", "🚀", "👍🏽", "\u0301", "\u0308", "\u200d", "\u00a0", "\u3000", "ǅ", "١", "<|im_end|>", "<|end|>", "<s>",
    "</s>", "<|user|>", "<|channel|>", "<|return|>", "'s", "'LL", "the", " the", "Hello", "    ", "\n\n",
]
