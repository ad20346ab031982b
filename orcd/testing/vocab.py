"""Working tokenizer vocabularies for synthetic GGUF files.

``write_tokenizer(writer, spec)`` writes the ``tokenizer.*`` metadata of a ``SynthSpec``: a vocabulary of exactly
``spec.vocab_size`` tokens that llama.cpp loads and tokenizes with, laid out as llama.cpp's converter writes the
real models':

* ``gpt2`` (Qwen2, GPT-OSS): the 256 byte tokens in GPT-2's byte-to-unicode order, then tokens learned by BPE from
  a built-in corpus (English, code, JSON, CJK, Cyrillic, accented Latin, emoji) pre-tokenized with the spec's
  ``tokenizer_pre`` regexes, then systematic word merges up to size, then the special tokens (CONTROL, or
  USER_DEFINED where the real converter marks them so). Merges are written in rank order.
* The special tokens come last: the roles' tokens that ``extra_special_tokens`` does not list, then
  ``extra_special_tokens`` in its order (``harmony_added_tokens(full=True)`` gives GPT-OSS's real ids).
* ``llama`` (Phi-3): ``<unk>``, ``<s>``, ``</s>`` (types as Phi-3's converter writes them), the 256 ``<0xNN>`` byte
  tokens, SentencePiece pieces with ``▁`` and descending scores (learned merges, then single characters, then
  systematic merges), then the added tokens (score -1000). Newlines, tabs and characters outside the learned
  alphabet (most CJK) are left to byte fallback, as in Llama-family vocabularies.

Vocabularies are cached per shape; the 201,088-token GPT-OSS one takes under a second. add_bos_token and
add_eos_token are written false, as the real Qwen2.5, Phi-3 (since its July 2024 update) and GPT-OSS files have them;
a key in the spec's metadata wins.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import gguf
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

from orcd.tokenizer import (
    BYTE, BYTE_TO_UNICODE, CONTROL, NORMAL, PRE_TOKENIZERS, SPECIAL_ID_KEYS, SPM_SPACE, USER_DEFINED,
)
from orcd.testing.templates import resolve_chat_template

if TYPE_CHECKING:
    from orcd.arch import SynthSpec

SPM_BASE = ("<unk>", "<s>", "</s>")
# Phi-3's tokenizer_config.json marks <unk> and <s> special (CONTROL) and </s> not (USER_DEFINED); llama.cpp's
# converter copies that.
_SPM_BASE_TYPES = (CONTROL, CONTROL, USER_DEFINED)
_SPM_ADDED_SCORE = -1000.0

# GPT-OSS (o200k_harmony): the roles as its GGUF names them, and its added tokens from id 199998 on.
HARMONY_SPECIAL_TOKENS = {"bos": "<|startoftext|>", "eos": "<|return|>", "pad": "<|endoftext|>"}
_HARMONY_NAMED = {199998: "<|startoftext|>", 199999: "<|endoftext|>", 200002: "<|return|>", 200003: "<|constrain|>",
                  200005: "<|channel|>", 200006: "<|start|>", 200007: "<|end|>", 200008: "<|message|>",
                  200012: "<|call|>", 200018: "<|endofprompt|>"}


def harmony_added_tokens(full: bool = False) -> list[str]:
    """GPT-OSS's added tokens in id order: through <|endofprompt|> (21), or all 1,090 up to id 201087 (``full``,
    the real vocabulary's layout: 199,998 BPE tokens before them)."""
    last = 201087 if full else 200018
    return [_HARMONY_NAMED.get(i, f"<|reserved_{i}|>") for i in range(199998, last + 1)]
_MAX_PIECE_CHARS = 16


@dataclass(frozen=True)
class Vocabulary:
    """A complete vocabulary, ready to write: tokens, types, scores (SentencePiece) or merges (BPE)."""

    model: str
    pre: str
    tokens: tuple[str, ...]
    types: tuple[int, ...]
    scores: tuple[float, ...] | None
    merges: tuple[str, ...]
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool


def write_tokenizer(writer: gguf.GGUFWriter, spec: "SynthSpec") -> None:
    """Write the tokenizer metadata (and chat template) of ``spec`` into a GGUF file under construction.

    Metadata keys already in ``spec.metadata`` win (e.g. ``tokenizer.ggml.add_bos_token``): they are not written
    twice."""
    vocab = build_vocabulary(spec.tokenizer, spec.tokenizer_pre, spec.vocab_size,
                             tuple(spec.special_tokens.items()), tuple(spec.extra_special_tokens))
    have = set(spec.metadata)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(list(vocab.tokens))
    writer.add_token_types(list(vocab.types))
    if vocab.scores is not None:
        writer.add_token_scores(list(vocab.scores))
    if vocab.merges:
        writer.add_token_merges(list(vocab.merges))
    for role, token_id in vocab.special_ids.items():
        writer.add_uint32(f"tokenizer.ggml.{SPECIAL_ID_KEYS[role]}", token_id)
    if "tokenizer.ggml.add_bos_token" not in have:
        writer.add_add_bos_token(vocab.add_bos)
    if "tokenizer.ggml.add_eos_token" not in have:
        writer.add_add_eos_token(vocab.add_eos)
    if spec.chat_template and "tokenizer.chat_template" not in have:
        writer.add_chat_template(resolve_chat_template(spec.chat_template))


@functools.lru_cache(maxsize=16)
def build_vocabulary(model: str, pre: str | None, vocab_size: int, special_tokens: tuple[tuple[str, str], ...],
                     extra_special: tuple[str, ...] = ()) -> Vocabulary:
    """The vocabulary of a synthetic model (deterministic: the same arguments give the same tokens)."""
    roles = dict(special_tokens)
    unknown = set(roles) - set(SPECIAL_ID_KEYS)
    if unknown:
        raise ValueError(f"special token roles {sorted(unknown)} are not GGUF roles ({', '.join(SPECIAL_ID_KEYS)})")
    # role tokens missing from extra_special first, then extra_special in its order (the real ids when it lists
    # them all, as harmony_added_tokens does)
    added = [t for t in dict.fromkeys(roles.values()) if t not in extra_special] + list(dict.fromkeys(extra_special))
    if model == "gpt2":
        pre = pre or "gpt-2"
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"tokenizer_pre {pre!r} is not one orcd knows ({', '.join(sorted(PRE_TOKENIZERS))})")
        tokens, types, merges = _bpe_vocabulary(pre, vocab_size, added)
        scores = None
    elif model == "llama":
        pre = "default"
        tokens, types, scores = _spm_vocabulary(vocab_size, [t for t in added if t not in SPM_BASE])
        merges = []
    else:
        raise ValueError(f"tokenizer {model!r}: synthetic vocabularies are 'gpt2' or 'llama'")
    index = {t: i for i, t in enumerate(tokens)}
    assert len(index) == len(tokens) == vocab_size, "synthetic vocabulary has duplicate tokens"
    special_ids = {role: index[text] for role, text in roles.items()}
    return Vocabulary(model=model, pre=pre, tokens=tuple(tokens), types=tuple(types),
                      scores=None if scores is None else tuple(scores), merges=tuple(merges),
                      special_ids=special_ids, add_bos=False, add_eos=False)


# --- byte-level BPE --------------------------------------------------------------------------------------------------
def _bpe_vocabulary(pre: str, vocab_size: int, added: list[str]) -> tuple[list[str], list[int], list[str]]:
    n_regular = vocab_size - len(added)
    if n_regular < 256:
        raise ValueError(f"vocab_size {vocab_size} leaves {n_regular} tokens beside {len(added)} special ones; a "
                         "byte-level vocabulary needs at least 256")
    byte_tokens = [BYTE_TO_UNICODE[b] for b in sorted(BYTE_TO_UNICODE, key=_gpt2_byte_order)]
    learned = _train_bpe(pre, n_regular)
    tokens = list(byte_tokens)
    known = set(tokens)
    merges: list[str] = []
    for a, b in learned:
        if a + b not in known and len(tokens) < n_regular:
            tokens.append(a + b)
            known.add(a + b)
            merges.append(f"{a} {b}")
    word = re.compile("^\u0120?[A-Za-z]+$")  # Ġ is the byte-level space
    tail = re.compile("^[a-z]+$")
    for a, b in _systematic_pairs(tokens, known, n_regular - len(tokens), word, tail):
        tokens.append(a + b)
        known.add(a + b)
        merges.append(f"{a} {b}")
    types = [NORMAL] * len(tokens)
    for text in added:  # CONTROL when it looks special (<|...|>), else USER_DEFINED (Qwen's <tool_call>)
        if text in known:
            raise ValueError(f"special token {text!r} collides with a learned token")
        tokens.append(text)
        types.append(CONTROL if _looks_special(text) else USER_DEFINED)
    return tokens, types, merges


def _gpt2_byte_order(b: int) -> tuple[int, int]:
    # GPT-2 numbers the bytes that stand for themselves first (in byte order), then the remapped ones
    return (0, b) if BYTE_TO_UNICODE[b] == chr(b) else (1, b)


def _looks_special(text: str) -> bool:
    # the converter's rule for tokens whose tokenizer_config does not say "special"
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<s>", "</s>", "<unk>", "<pad>", "<mask>")


def _train_bpe(pre: str, n_regular: int) -> list[tuple[str, str]]:
    tok = Tokenizer(models.BPE())
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre].regexes]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    trainer = trainers.BpeTrainer(vocab_size=n_regular, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  max_token_length=_MAX_PIECE_CHARS)
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    return _trained_merges(tok)


def _trained_merges(tok: Tokenizer) -> list[tuple[str, str]]:
    import json

    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]  # type: ignore[misc]


def _systematic_pairs(tokens: list[str], known: set[str], count: int, head: re.Pattern[str],
                      tail: re.Pattern[str]) -> list[tuple[str, str]]:
    """``count`` new word tokens, each a merge of two existing ones (a word-start with a lower-case tail), frequent
    pairs first: they look like rare words and can fire on real text."""
    if count <= 0:
        return []
    pairs: list[tuple[str, str]] = []
    heads = [t for t in tokens if head.match(t) and len(t) < _MAX_PIECE_CHARS]
    tails = [t for t in tokens if tail.match(t) and len(t) < _MAX_PIECE_CHARS // 2]
    new: set[str] = set()
    while len(pairs) < count:
        grown = len(pairs)
        for s in range(len(heads) + len(tails)):  # anti-diagonals: pair ranks i + j = s
            for i in range(max(0, s - len(tails) + 1), min(s + 1, len(heads))):
                a, b = heads[i], tails[s - i]
                if a + b in known or a + b in new:
                    continue
                pairs.append((a, b))
                new.add(a + b)
                if len(pairs) == count:
                    return pairs
        if len(pairs) == grown:
            raise ValueError("cannot grow the synthetic vocabulary any further")
        heads = [a + b for a, b in pairs[grown:]]  # next round: longer words from the new ones
    return pairs


# --- SentencePiece ---------------------------------------------------------------------------------------------------
def _spm_vocabulary(vocab_size: int, added: list[str]) -> tuple[list[str], list[int], list[float]]:
    n_pieces = vocab_size - len(SPM_BASE) - 256 - len(added)
    if n_pieces < 64:
        raise ValueError(f"vocab_size {vocab_size} leaves {n_pieces} SentencePiece pieces beside the 259 base tokens "
                         f"and {len(added)} added ones; at least 64 are needed")
    tokens = [*SPM_BASE, *(f"<0x{b:02X}>" for b in range(256))]
    types = [*_SPM_BASE_TYPES, *([BYTE] * 256)]
    scores = [0.0] * len(tokens)
    merges, alphabet = _train_spm(n_pieces)
    known = set(tokens)
    pieces: list[str] = []
    # whitespace runs (code indentation) as llama's vocabulary has them, then the learned merges
    runs = [SPM_SPACE * n for n in (2, 4, 8, 3, 16)]
    for piece in runs + [a + b for a, b in merges]:
        if piece not in known and len(pieces) < n_pieces - len(alphabet):
            pieces.append(piece)
            known.add(piece)
    for c in alphabet:
        if c not in known:
            pieces.append(c)
            known.add(c)
    word = re.compile(f"^{SPM_SPACE}?[A-Za-z]+$")
    tail = re.compile("^[a-z]+$")
    pieces += [a + b for a, b in _systematic_pairs(pieces, known, n_pieces - len(pieces), word, tail)]
    if len(pieces) != n_pieces:
        raise ValueError(f"SentencePiece vocabulary came out with {len(pieces)} pieces, not {n_pieces}")
    tokens += pieces
    types += [NORMAL] * len(pieces)
    scores += [-float(i) for i in range(len(pieces))]  # rank order: earlier pieces merge first
    tokens += added
    types += [CONTROL] * len(added)
    scores += [_SPM_ADDED_SCORE] * len(added)
    return tokens, types, scores


def _train_spm(n_pieces: int) -> tuple[list[tuple[str, str]], list[str]]:
    """Merges and alphabet of a SentencePiece-style BPE over the corpus (words start with ▁; no newlines, tabs or
    '|', which stay byte tokens). The alphabet keeps the most frequent characters, about a quarter of the pieces."""
    lines = [line.rstrip("\n").replace("\t", "    ").replace("|", "") for line in corpus_lines()]
    alphabet_size = max(40, n_pieces // 4)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPM_SPACE, prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=n_pieces, min_frequency=2, show_progress=False,
                                  limit_alphabet=alphabet_size, max_token_length=_MAX_PIECE_CHARS)
    tok.train_from_iterator(lines, trainer=trainer)
    merges = _trained_merges(tok)
    merged = {a + b for a, b in merges}
    alphabet = sorted((t for t in tok.get_vocab() if t not in merged and len(t) == 1),
                      key=lambda c: tok.get_vocab()[c])
    return merges, alphabet


# --- the corpus ------------------------------------------------------------------------------------------------------
_PROSE = """\
The quick brown fox jumps over the lazy dog. It's a sentence that uses every letter, and we've all seen it before.
Language models read text as tokens: pieces of words, whole words, punctuation and spaces. A tokenizer that learned
from English, code and other languages splits common words into one token and rare ones into several.
In 1969, people walked on the moon; by 2024 there were 8,100,000,000 people on Earth. Prices rose 3.5% in March.
She said, "I'll be there at 10:30 a.m. on Tuesday, September 17th." They'd never heard of it, but they're coming.
Don't worry about the weather: the forecast says it will be sunny, with a high of 27 degrees and a light breeze.
Please find attached the report for the third quarter. Revenue increased by 12 percent compared to last year.
What is the capital of France? Paris is the capital and the largest city of France, on the river Seine.
Machine learning, deep learning and neural networks are used for translation, search and recommendation systems.
Write a function that returns the sum of two numbers. Explain the difference between a list and a tuple in Python.
"""

_CODE = '''\
def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    result = [0, 1]
    while len(result) < n:
        result.append(result[-1] + result[-2])
    return result[:n]


class Matrix:
    def __init__(self, rows, cols):
        self.rows = rows
        self.cols = cols
        self.data = [[0.0] * cols for _ in range(rows)]

    def __getitem__(self, index):
        return self.data[index]


for i in range(10):
    if i % 2 == 0:
        print(f"{i} is even")
    else:
        print(f"{i} is odd")

import os, sys, json
config = {"name": "orcd", "version": "0.1.0", "layers": 24, "heads": 14, "rope_theta": 1000000.0}
print(json.dumps(config, indent=2))

#include <stdio.h>
int main(int argc, char **argv) {
    for (int i = 0; i < argc; ++i) {
        printf("%s\\n", argv[i]);
    }
    return 0;
}

function add(a, b) { return a + b; }
const items = [1, 2, 3].map((x) => x * 2);
SELECT id, name FROM users WHERE age >= 18 ORDER BY name;
<div class="container"><p>Hello, world!</p></div>
'''

_OTHER = """\
人工智能是计算机科学的一个分支。我们今天学习中文，明天去北京。这是一个测试句子，用来训练分词器。
机器学习和深度学习正在改变世界。你好，世界！天气很好，我们去公园散步吧。
日本語のテキストも少し含めます。東京は日本の首都です。ありがとうございます。
한국어 문장도 있습니다. 안녕하세요, 만나서 반갑습니다.
Привет, мир! Это пример текста на русском языке. Москва — столица России.
Café, naïve, résumé, façade, jalapeño, Zürich, São Paulo, Kraków, Ångström, Øresund.
Emoji: 😀 🚀 👍🏽 ❤️ 🎉 🇫🇷 — and math: ∑ x² ≤ π · ∞, α β γ δ.
"""

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will can more other its into time only "
    "new some could these two may first then do any like my now over such our man me even most made after also "
    "did many before must through years where much your way well down should because each just those people how "
    "too little state good very make world still own see men work long here get both between life being under "
    "never day same another know while last might us great old year off come since against go came right used "
    "take three small model token layer tensor cache memory server request response error value number string "
    "function return class import print data file path model weights quantized attention rotary embedding"
).split()


def corpus_lines() -> list[str]:
    """The training text: the fixed passages several times, and seeded sentences over a word list with numbers,
    identifiers and punctuation (so frequencies look like text)."""
    return list(_corpus())


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    rng = random.Random(20240917)
    lines = (_PROSE + _CODE + _OTHER).splitlines(keepends=True) * 4
    for _ in range(3000):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.5:
            words[0] = words[0].capitalize()
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 2100)))
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), f"{rng.choice(_WORDS)}_{rng.choice(_WORDS)}")
        lines.append(" ".join(words) + rng.choice([".", ".", ",", "?", "!", ":", ";"]) + "\n")
    return tuple(lines)
