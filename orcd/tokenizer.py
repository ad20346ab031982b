"""Tokenizers from a GGUF file's vocabulary or from a Hugging Face ``tokenizer.json``, behind one interface.

The GGUF backend rebuilds the ``tokenizer.ggml.*`` vocabulary as a ``tokenizers.Tokenizer`` that tokenizes as
llama.cpp does (its ``llama-vocab.cpp`` is the reference the tests compare against):

* ``gpt2`` (byte-level BPE: Qwen2, GPT-OSS): the pre-tokenizer regexes llama.cpp uses for ``tokenizer.ggml.pre``
  (each regex splits the pieces of the previous one; unmatched text stays a piece), then the GPT-2 byte mapping
  and the merges in file order. No Unicode normalization, as in llama.cpp (Hugging Face's Qwen2 tokenizer applies
  NFC first; the two differ on decomposed accents).
* ``llama`` (SentencePiece BPE: Phi-3): spaces become ``▁``, one is prepended to every run of text that starts the
  input or follows a special token (``add_space_prefix``), adjacent pieces merge best score first, and characters
  outside the vocabulary fall back to ``<0xNN>`` byte tokens. The score order becomes a merge list.

Special tokens are matched in the raw text before anything else (``parse_special``); CONTROL tokens only when
asked, USER_DEFINED ones always. The token attributes are adjusted as llama.cpp's loader adjusts them (end-of-
generation texts become CONTROL; the harmony ``<|channel|>`` family and, next to ``<|return|>``/``<|call|>``,
``<|end|>`` become USER_DEFINED; Phi-3 models strip whitespace right of their special tokens).

Decoding of GGUF vocabularies goes through a table of each token's bytes (the ``llama_token_to_piece`` rules), so
``StreamDecoder`` can emit complete UTF-8 characters only, holding back a character split across byte tokens.
The ``tokenizer.json`` backend uses the file's own pipeline and ``tokenizers``' ``DecodeStream``.
"""

from __future__ import annotations

import codecs
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import tokenizers
from gguf import TokenType
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from orcd.errors import ModelFileError

if TYPE_CHECKING:
    from orcd.modelfile import ModelFile

SPM_SPACE = "\u2581"  # ▁, SentencePiece's visible space

# --- pre-tokenizers --------------------------------------------------------------------------------------------------
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_QWEN2_REGEX = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_REGEX = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# o200k's regex as llama.cpp rewrites it: its upper/lower-case classes become "a letter that is not a-z / A-Z",
# and combining marks are not letters. The original differs from it on non-ASCII mixed case and on marks.
_UPPERISH = r"(?:(?=\p{L})[^a-z])"
_LOWERISH = r"(?:(?=\p{L})[^A-Z])"
_GPT4O_REGEX = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPERISH}*{_LOWERISH}+{_CONTRACTIONS}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPERISH}+{_LOWERISH}*{_CONTRACTIONS}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp splits text before BPE for one ``tokenizer.ggml.pre`` value."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a word that is itself a token is taken whole (llama3)


PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    # llama.cpp's fallback for BPE vocabularies that name no known pre-tokenizer
    "default": PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]")),
    "gpt-2": PreTokenizer((_GPT2_REGEX,)),
    "qwen2": PreTokenizer((_QWEN2_REGEX,)),
    "deepseek-r1-qwen": PreTokenizer((_QWEN2_REGEX,)),
    "gpt-4o": PreTokenizer((_GPT4O_REGEX,)),
    "llama4": PreTokenizer((_GPT4O_REGEX,)),
    "llama3": PreTokenizer((_LLAMA3_REGEX,), ignore_merges=True),
    "llama-v3": PreTokenizer((_LLAMA3_REGEX,), ignore_merges=True),
    "llama-bpe": PreTokenizer((_LLAMA3_REGEX,), ignore_merges=True),
}

# Token texts llama.cpp treats as end of generation whatever the metadata says (llama-vocab.cpp, "special_eog_ids"),
# and the fill-in-the-middle pad / repo / file-separator tokens it also stops on.
EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]", "<|fim_repo|>", "<|repo_name|>", "<fim-repo>",
    "<REPO>", "<reponame>", "<|file_sep|>",
})
# Fill-in-the-middle prefix/suffix/middle texts: llama.cpp makes them CONTROL without making them end generation.
FIM_TEXTS = frozenset({
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<PRE>", "<|code_prefix|>", "<|prefix|>",
    "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<SUF>", "<|code_suffix|>", "<|suffix|>",
    "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<MID>", "<|code_middle|>", "<|middle|>",
})
# Harmony's structure tokens: llama.cpp always renders them (USER_DEFINED), so decoded text keeps the channels.
HARMONY_RENDERED = frozenset({"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"})

# tokenizer.ggml.<key> for each special-token role
SPECIAL_ID_KEYS: dict[str, str] = {
    "bos": "bos_token_id", "eos": "eos_token_id", "eot": "eot_token_id", "eom": "eom_token_id",
    "unk": "unknown_token_id", "sep": "seperator_token_id", "pad": "padding_token_id", "mask": "mask_token_id",
    "fim_pre": "fim_pre_token_id", "fim_suf": "fim_suf_token_id", "fim_mid": "fim_mid_token_id",
    "fim_pad": "fim_pad_token_id", "fim_rep": "fim_rep_token_id", "fim_sep": "fim_sep_token_id",
}

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = (
    int(TokenType.NORMAL), int(TokenType.UNKNOWN), int(TokenType.CONTROL), int(TokenType.USER_DEFINED),
    int(TokenType.UNUSED), int(TokenType.BYTE),
)
_SPECIAL_TYPES = (CONTROL, USER_DEFINED, UNKNOWN)  # matched in raw text before tokenizing


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → character map: printable Latin-1 bytes stand for themselves, the other 68 bytes
    take the code points from 256 on, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


BYTE_TO_UNICODE = bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


# --- the GGUF vocabulary ---------------------------------------------------------------------------------------------
@dataclass
class GGUFVocab:
    """The ``tokenizer.ggml.*`` metadata of a file, checked for consistency."""

    model: str  # "gpt2" or "llama"
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[tuple[str, str]]
    special: dict[str, int]  # role → id, from the metadata
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    model_name: str = ""  # general.name, lower case (llama.cpp keys a Phi-3 rule on it)
    source: str = "GGUF"

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], source: str = "GGUF") -> "GGUFVocab":
        def need(key: str) -> Any:
            if key not in meta:
                raise ModelFileError(f"{source}: required metadata key {key!r} is missing", key=key)
            return meta[key]

        model = str(need("tokenizer.ggml.model"))
        if model not in ("gpt2", "llama"):
            raise ModelFileError(
                f"{source}: tokenizer.ggml.model is {model!r}; orcd reads 'gpt2' (byte-level BPE) and 'llama' "
                "(SentencePiece) vocabularies", key="tokenizer.ggml.model",
            )
        tokens = _str_list(need("tokenizer.ggml.tokens"), "tokenizer.ggml.tokens", source)
        if not tokens:
            raise ModelFileError(f"{source}: tokenizer.ggml.tokens is empty", key="tokenizer.ggml.tokens")
        n = len(tokens)
        raw_types = meta.get("tokenizer.ggml.token_type")
        types = [NORMAL] * n if raw_types is None else [int(t) for t in raw_types]
        if len(types) != n:
            raise ModelFileError(
                f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {n} tokens",
                key="tokenizer.ggml.token_type",
            )
        bad = next((i for i, t in enumerate(types) if t not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE)),
                   None)
        if bad is not None:
            raise ModelFileError(f"{source}: tokenizer.ggml.token_type[{bad}] is {types[bad]}, not a token type",
                                 key="tokenizer.ggml.token_type")
        scores = meta.get("tokenizer.ggml.scores")
        if scores is not None:
            scores = [float(s) for s in scores]
            if len(scores) != n:
                raise ModelFileError(f"{source}: tokenizer.ggml.scores has {len(scores)} entries for {n} tokens",
                                     key="tokenizer.ggml.scores")
        merges: list[tuple[str, str]] = []
        if model == "gpt2":
            merges = _parse_merges(need("tokenizer.ggml.merges"), source)
        elif scores is None:
            raise ModelFileError(f"{source}: a SentencePiece vocabulary needs tokenizer.ggml.scores",
                                 key="tokenizer.ggml.scores")
        special: dict[str, int] = {}
        for role, suffix in SPECIAL_ID_KEYS.items():
            key = f"tokenizer.ggml.{suffix}"
            if key in meta:
                value = int(meta[key])
                if not 0 <= value < n:
                    raise ModelFileError(f"{source}: {key} is {value}, outside the vocabulary of {n} tokens", key=key)
                special[role] = value
        if model == "llama":  # llama.cpp's defaults for SentencePiece vocabularies
            for role, default in (("bos", 1), ("eos", 2), ("unk", 0)):
                if role not in special and default < n:
                    special[role] = default
        pre = str(meta.get("tokenizer.ggml.pre", "default"))
        if model == "gpt2" and pre not in PRE_TOKENIZERS:
            raise ModelFileError(
                f"{source}: tokenizer.ggml.pre is {pre!r}, a pre-tokenizer orcd does not know; known: "
                f"{', '.join(sorted(PRE_TOKENIZERS))}", key="tokenizer.ggml.pre",
            )
        # llama.cpp: SentencePiece adds BOS unless told otherwise, BPE does not (except llama3-style vocabularies).
        default_bos = model == "llama" or PRE_TOKENIZERS.get(pre, PreTokenizer(())).ignore_merges
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_bos))
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        for flag, role in ((add_bos, "bos"), (add_eos, "eos")):
            if flag and role not in special:
                raise ModelFileError(
                    f"{source}: tokenizer.ggml.add_{role}_token is set but tokenizer.ggml.{SPECIAL_ID_KEYS[role]} "
                    "is missing", key=f"tokenizer.ggml.{SPECIAL_ID_KEYS[role]}",
                )
        add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", model == "llama"))
        return cls(model=model, pre=pre, tokens=tokens, types=types, scores=scores, merges=merges, special=special,
                   add_bos=add_bos, add_eos=add_eos, add_space_prefix=add_space_prefix,
                   model_name=str(meta.get("general.name", "")).lower(), source=source)

    # --- llama.cpp's loader rules ----------------------------------------------------------------------------------
    def effective_types(self) -> tuple[list[int], set[int]]:
        """Token types after llama.cpp's loader has adjusted them, and the end-of-generation ids."""
        types = list(self.types)
        by_text = _first_ids(self.tokens)
        eog: set[int] = set()
        for text in (EOG_TEXTS | FIM_TEXTS) & by_text.keys():
            i = by_text[text]
            types[i] = CONTROL  # llama.cpp adds the CONTROL attribute, which decides how the token behaves
            if text in EOG_TEXTS:
                eog.add(i)
        for text in HARMONY_RENDERED & by_text.keys():
            types[by_text[text]] = USER_DEFINED
        eog.update(self.special[r] for r in ("eos", "eot", "eom") if r in self.special)
        texts = {self.tokens[i]: i for i in eog}
        if "<|end|>" in texts and ("<|return|>" in texts or "<|flush|>" in texts) and (
            "<|call|>" in texts or "<|calls|>" in texts
        ):
            # harmony: <|end|> closes a message, not the turn
            eog.discard(texts["<|end|>"])
            types[texts["<|end|>"]] = USER_DEFINED
        return types, eog

    def rstrip_ids(self, types: Sequence[int]) -> set[int]:
        """Special tokens that swallow the whitespace to their right: llama.cpp sets this for models whose
        general.name says Phi-3 (as their tokenizer.json does)."""
        if "phi-3" not in self.model_name and "phi3" not in self.model_name:
            return set()
        ids = {i for i, t in enumerate(types) if t in _SPECIAL_TYPES}
        by_text = _first_ids(self.tokens)
        if "</s>" in by_text:
            ids.add(by_text["</s>"])
        for text in ("<unk>", "<s>", "<|endoftext|>"):
            ids.discard(by_text.get(text, -1))
        return ids


def _str_list(value: Any, key: str, source: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ModelFileError(f"{source}: {key} must be an array of strings", key=key)
    return list(value)


def _parse_merges(value: Any, source: str) -> list[tuple[str, str]]:
    key = "tokenizer.ggml.merges"
    merges: list[tuple[str, str]] = []
    for i, m in enumerate(_str_list(value, key, source)):
        cut = m.find(" ", 1)  # as llama.cpp: the first space after the first character
        if cut < 0:
            raise ModelFileError(f"{source}: {key}[{i}] is {m!r}, not two tokens separated by a space", key=key)
        merges.append((m[:cut], m[cut + 1:]))
    return merges


def _first_ids(tokens: Sequence[str]) -> dict[str, int]:
    ids: dict[str, int] = {}
    for i, t in enumerate(tokens):
        ids.setdefault(t, i)
    return ids


# --- building the tokenizers.Tokenizer ------------------------------------------------------------------------------
def _bpe_pipeline(v: GGUFVocab, vocab: dict[str, int]) -> tokenizers.Tokenizer:
    for i, (a, b) in enumerate(v.merges):
        for part in (a, b, a + b):
            if part not in vocab:
                raise ModelFileError(
                    f"{v.source}: tokenizer.ggml.merges[{i}] ({a!r} {b!r}) needs {part!r}, which is not a token",
                    key="tokenizer.ggml.merges",
                )
    pre = PRE_TOKENIZERS[v.pre]
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=v.merges, ignore_merges=pre.ignore_merges))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def spm_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE as a merge list: every split of a token into two tokens, best-scoring result first (ties:
    lower id). llama.cpp merges the adjacent pair whose concatenation is the best-scoring token, which is the same
    order."""
    ids = _first_ids(tokens)
    ranked: list[tuple[float, int, str, str]] = []
    for i, text in enumerate(tokens):
        if ids[text] != i:
            continue
        for k in range(1, len(text)):
            left, right = text[:k], text[k:]
            if left in ids and right in ids:
                ranked.append((-scores[i], i, left, right))
    ranked.sort()
    return [(a, b) for _, _, a, b in ranked]


def _spm_pipeline(v: GGUFVocab, vocab: dict[str, int]) -> tokenizers.Tokenizer:
    assert v.scores is not None
    unk = v.tokens[v.special["unk"]] if "unk" in v.special else None
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=spm_merges(v.tokens, v.scores), unk_token=unk,
                                          byte_fallback=True, fuse_unk=False))
    steps = [normalizers.Replace(" ", SPM_SPACE)]
    if v.add_space_prefix:
        steps.insert(0, normalizers.Prepend(SPM_SPACE))  # per piece of text, so also after each special token
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if v.add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    return tok


def _post_processor(bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> processors.PostProcessor | None:
    if bos is None and eos is None:
        return None
    head = [bos[0]] if bos else []
    tail = [eos[0]] if eos else []
    specials = [t for t in (bos, eos) if t is not None]
    return processors.TemplateProcessing(
        single=[*head, "$A", *tail],
        pair=[*head, "$A", *tail, *head, "$B", *tail],
        special_tokens=list(dict(specials).items()),
    )


def _piece_bytes(v: GGUFVocab, types: Sequence[int]) -> list[bytes]:
    """Each token's bytes as llama_token_to_piece renders it with special=true (CONTROL/UNKNOWN show their text)."""
    pieces: list[bytes] = []
    for i, (text, t) in enumerate(zip(v.tokens, types)):
        if t in (CONTROL, USER_DEFINED, UNKNOWN):
            pieces.append(text.encode("utf-8"))
        elif t == UNUSED:
            pieces.append(b"")
        elif v.model == "gpt2":
            pieces.append(bytes(UNICODE_TO_BYTE.get(c, 0x3F) for c in text) if t == NORMAL else b"")
        elif t == BYTE:
            pieces.append(bytes([_byte_token_value(text, i, v.source)]))
        else:
            pieces.append(text.replace(SPM_SPACE, " ").encode("utf-8"))
    return pieces


def _byte_token_value(text: str, index: int, source: str) -> int:
    if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
        try:
            return int(text[3:5], 16)
        except ValueError:
            pass
    raise ModelFileError(f"{source}: tokenizer.ggml.tokens[{index}] is {text!r}, a BYTE token not of the form <0xNN>",
                         key="tokenizer.ggml.tokens")


# --- the tokenizer ---------------------------------------------------------------------------------------------------
@dataclass
class _Specials:
    bos_id: int | None
    eos_id: int | None
    eot_ids: frozenset[int]
    special_ids: frozenset[int]  # tokens hidden by decode(skip_special=True) and not parsed with parse_special=False
    add_bos: bool = False
    add_eos: bool = False
    extra: dict[str, int] = field(default_factory=dict)  # other roles (pad, unk, eot, ...) → id


class Tokenizer:
    """Text ↔ token ids. Build with ``from_gguf`` (the model file's vocabulary) or ``from_file`` (tokenizer.json)."""

    def __init__(self, hf: tokenizers.Tokenizer, specials: _Specials, *, pieces: list[bytes] | None = None,
                 texts: list[str] | None = None, strip_first_space: bool = False,
                 rstrip_ids: Iterable[int] = (), source: str = "") -> None:
        self.hf = hf
        self._specials = specials
        self._pieces = pieces
        self._texts = texts
        self._strip_first_space = strip_first_space
        self.source = source
        self._lock = threading.Lock()  # encode_special_tokens is a setting of the shared tokenizers object
        # Special tokens that swallow the ASCII whitespace after them (llama.cpp's rule: isspace). Done on the text
        # before tokenizing, as tokenizers' own rstrip would also swallow Unicode spaces (U+3000, U+00A0).
        self._rstrip_ids = frozenset(rstrip_ids)
        self._rstrip_patterns: dict[bool, re.Pattern[str] | None] = {}

    # --- construction ----------------------------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, model: "ModelFile") -> "Tokenizer":
        return cls.from_metadata(model.metadata, source=str(model.path))

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], source: str = "GGUF") -> "Tokenizer":
        v = GGUFVocab.from_metadata(meta, source)
        types, eog = v.effective_types()
        vocab = _first_ids(v.tokens)
        hf = _bpe_pipeline(v, vocab) if v.model == "gpt2" else _spm_pipeline(v, vocab)
        added = [
            AddedToken(v.tokens[i], special=types[i] != USER_DEFINED, normalized=False)
            for i, t in enumerate(types) if t in _SPECIAL_TYPES and vocab[v.tokens[i]] == i
        ]
        hf.add_tokens(added)
        bos = v.special.get("bos")
        eos = v.special.get("eos")
        hf.post_processor = _post_processor(
            (v.tokens[bos], bos) if v.add_bos and bos is not None else None,
            (v.tokens[eos], eos) if v.add_eos and eos is not None else None,
        )
        specials = _Specials(
            bos_id=bos, eos_id=eos, eot_ids=frozenset(eog),
            special_ids=frozenset(i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)),
            add_bos=v.add_bos, add_eos=v.add_eos, extra=dict(v.special),
        )
        return cls(hf, specials, pieces=_piece_bytes(v, types), texts=v.tokens,
                   strip_first_space=v.model == "llama" and v.add_space_prefix, rstrip_ids=v.rstrip_ids(types),
                   source=source)

    @classmethod
    def from_file(cls, path: str | Path, model: "ModelFile | None" = None) -> "Tokenizer":
        """A Hugging Face tokenizer: ``tokenizer.json`` or a directory holding it. BOS/EOS come from the
        ``tokenizer_config.json`` beside it, else from ``model``'s metadata (the GGUF it is used with)."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ModelFileError(f"{file}: no such tokenizer file", path=str(file))
        try:
            hf = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:
            raise ModelFileError(f"{file}: not a Hugging Face tokenizer.json ({e})", path=str(file)) from None
        config = _read_json(file.parent / "tokenizer_config.json")
        added = hf.get_added_tokens_decoder()
        special_ids = {i for i, t in added.items() if t.special}

        def role_id(role: str) -> int | None:
            entry = config.get(f"{role}_token")
            text = entry.get("content") if isinstance(entry, dict) else entry
            if isinstance(text, str) and hf.token_to_id(text) is not None:
                return hf.token_to_id(text)
            if model is not None and (key := f"tokenizer.ggml.{SPECIAL_ID_KEYS[role]}") in model.metadata:
                return int(model.metadata[key])
            return None

        bos, eos = role_id("bos"), role_id("eos")
        texts = {t.content: i for i, t in added.items()}
        eog = {i for text, i in texts.items() if text in EOG_TEXTS}
        eog.update(i for i in (eos, role_id("eot")) if i is not None)
        if "<|return|>" in texts and "<|call|>" in texts:
            eog.discard(texts.get("<|end|>", -1))
        probe = hf.encode("", add_special_tokens=True).ids  # what the post-processor adds
        specials = _Specials(
            bos_id=bos, eos_id=eos, eot_ids=frozenset(eog), special_ids=frozenset(special_ids),
            add_bos=bos is not None and bos in probe[:1], add_eos=eos is not None and eos in probe[-1:],
            extra={r: i for r in ("pad", "unk", "eot") if (i := role_id(r)) is not None},
        )
        return cls(hf, specials, source=str(file))

    def save(self, directory: str | Path, chat_template: str | None = None) -> Path:
        """Write ``tokenizer.json`` and a ``tokenizer_config.json`` naming BOS/EOS (and the chat template): a
        directory ``from_file`` and ``transformers`` can load."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = json.loads(self.hf.to_str())
        for entry in data.get("added_tokens", []):  # in tokenizer.json the strip is the token's own setting
            if entry["id"] in self._rstrip_ids:
                entry["rstrip"] = True
        (directory / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                                  "add_bos_token": self.add_bos, "add_eos_token": self.add_eos}
        for role, i in (("bos", self.bos_id), ("eos", self.eos_id), *self._specials.extra.items()):
            if i is not None and role in ("bos", "eos", "pad", "unk"):
                config[f"{role}_token"] = self.token_text(i)
        if chat_template is not None:
            config["chat_template"] = chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        return directory / "tokenizer.json"

    # --- properties ------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._texts) if self._texts is not None else self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._specials.bos_id

    @property
    def eos_id(self) -> int | None:
        return self._specials.eos_id

    @property
    def eot_ids(self) -> frozenset[int]:
        """Every token that ends generation: EOS, end-of-turn tokens (``<|im_end|>``, ``<|end|>``, ``<|return|>``,
        ``<|call|>``, ...) as llama.cpp counts them."""
        return self._specials.eot_ids

    @property
    def special_ids(self) -> frozenset[int]:
        return self._specials.special_ids

    @property
    def add_bos(self) -> bool:
        return self._specials.add_bos

    @property
    def add_eos(self) -> bool:
        return self._specials.add_eos

    def special_id(self, role: str) -> int | None:
        """The id of a special-token role from the metadata: bos, eos, eot, pad, unk, ..."""
        return {"bos": self.bos_id, "eos": self.eos_id}.get(role, self._specials.extra.get(role))

    def token_text(self, token_id: int) -> str:
        """The token as the vocabulary spells it (``Ġthe``, ``▁the``, ``<|im_end|>``, ``<0x0A>``)."""
        self._check_id(token_id)
        if self._texts is not None:
            return self._texts[token_id]
        text = self.hf.id_to_token(token_id)
        return "" if text is None else text

    def token_to_id(self, text: str) -> int | None:
        return self.hf.token_to_id(text)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes the token stands for when decoded (special tokens: their text)."""
        self._check_id(token_id)
        if self._pieces is not None:
            return self._pieces[token_id]
        return self.hf.decode([token_id], skip_special_tokens=False).encode("utf-8")

    # --- encode / decode -------------------------------------------------------------------------------------------
    def encode_chat(self, rendered: str) -> list[int]:
        """Token ids of a chat-template rendering: control-token text parsed, BOS added as the vocabulary asks
        unless the template already wrote it (a double BOS would change what the model sees)."""
        wrote_bos = self.bos_id is not None and rendered.startswith(self.token_text(self.bos_id))
        return self.encode(rendered, add_special=not wrote_bos, parse_special=True)

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``. ``add_special``: BOS/EOS as the vocabulary asks; ``parse_special``: control-token
        text in ``text`` becomes those tokens (off for untrusted user text)."""
        strip = self._rstrip_pattern(parse_special)
        if strip is not None:
            text = strip.sub(r"\1", text)
        with self._lock:
            self.hf.encode_special_tokens = not parse_special
            try:
                return self.hf.encode(text, add_special_tokens=add_special).ids
            finally:
                self.hf.encode_special_tokens = False

    def _rstrip_pattern(self, parse_special: bool) -> re.Pattern[str] | None:
        if parse_special not in self._rstrip_patterns:
            texts = sorted({self.token_text(i) for i in self._rstrip_ids
                            if parse_special or i not in self._specials.special_ids}, key=len, reverse=True)
            self._rstrip_patterns[parse_special] = (
                re.compile("(" + "|".join(map(re.escape, texts)) + ")[ \t\n\v\f\r]+") if texts else None
            )
        return self._rstrip_patterns[parse_special]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``; malformed UTF-8 becomes U+FFFD. SentencePiece vocabularies drop the space the first
        token carries (the one encode prepended), as llama.cpp's detokenizer does."""
        ids = list(ids)
        if self._pieces is None:
            for i in ids:
                self._check_id(i)
            return self.hf.decode(ids, skip_special_tokens=skip_special)
        out = bytearray()
        first = True
        for i in ids:
            self._check_id(i)
            if skip_special and i in self._specials.special_ids:
                continue
            piece = self._pieces[i]
            if first and self._strip_first_space and piece.startswith(b" "):
                piece = piece[1:]
            first = False
            out += piece
        return out.decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = False, context: Sequence[int] = (),
                       start_of_text: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special=skip_special, context=context, start_of_text=start_of_text)

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary of {self.vocab_size} tokens")

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"


class StreamDecoder:
    """Incremental detokenizer: ``feed`` one token id at a time and get the text that is complete so far. A
    character whose UTF-8 bytes are split across tokens is held back until its last byte arrives; ``flush`` at the
    end returns what is left (an unfinished character as U+FFFD).

    The fed tokens continue a prompt: a SentencePiece token's leading space is text, as llama.cpp and OpenAI-style
    servers stream it (``context``, the prompt's ids, is only needed by the tokenizer.json backend when its decoder
    depends on the preceding tokens). ``start_of_text=True`` decodes the stream as ``decode`` would, dropping the
    space SentencePiece prepends to a text."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False, context: Sequence[int] = (),
                 start_of_text: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip_next = tokenizer._strip_first_space and start_of_text
        self._hf_stream = None
        if tokenizer._pieces is None:
            prefix = list(context)[-8:]
            if not prefix and not start_of_text:
                # tokenizers' decoders strip the first token's space at the start of a text; decoding after a
                # plain token makes it a continuation
                plain = tokenizer.hf.token_to_id("a")
                prefix = [plain] if plain is not None else []
            self._hf_stream = decoders.DecodeStream(ids=prefix or None, skip_special_tokens=skip_special)

    def feed(self, token_id: int) -> str:
        tok = self.tokenizer
        if self._hf_stream is not None:
            tok._check_id(token_id)
            return self._hf_stream.step(tok.hf, token_id) or ""
        if self.skip_special and token_id in tok.special_ids:
            return ""
        piece = tok.token_bytes(token_id)
        if self._strip_next:
            self._strip_next = False
            piece = piece.removeprefix(b" ")
        return self._utf8.decode(piece)

    def flush(self) -> str:
        if self._hf_stream is not None:
            return ""
        return self._utf8.decode(b"", final=True)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{path}: not readable JSON ({e})", path=str(path)) from None
    return data if isinstance(data, dict) else {}
