"""Chat templates: the model's Jinja template, rendered in a sandbox.

A GGUF file is untrusted input, so its ``tokenizer.chat_template`` runs in jinja2's ``ImmutableSandboxedEnvironment``:
no attribute starting with ``_`` (no ``__class__``/``__globals__`` escapes through strings, ``cycler``, ``joiner``,
``lipsum`` or macros), no mutation of the messages, ``range`` and repetition capped so a template cannot exhaust
memory. A template that reaches past the sandbox raises ``ModelFileError``; one that rejects the conversation
(``raise_exception``) raises ``InvalidRequest``.

The environment is the one Hugging Face's ``apply_chat_template`` renders with (``trim_blocks``, ``lstrip_blocks``,
``loopcontrols``, a ``tojson`` that does not HTML-escape, ``raise_exception``, ``strftime_now``, the
``{% generation %}`` block), so a template renders here as it does with ``transformers``.

``split_harmony_channels`` splits GPT-OSS output (harmony format) into its ``analysis``, ``commentary`` and
``final`` channels and tool calls.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from orcd.errors import InvalidRequest, ModelFileError

if TYPE_CHECKING:
    from orcd.modelfile import ModelFile

# Texts that end an assistant turn, in the order they are reported; only those the template writes count.
TURN_END_TEXTS = ("<|im_end|>", "<|end|>", "<|eot_id|>", "<end_of_turn>", "<|return|>", "<|call|>", "<|eom_id|>")
MAX_RENDER_CHARS = 16 * 1024 * 1024  # a rendered prompt larger than this is a runaway template
MAX_RANGE_ITEMS = 1_000_000  # total items all range() calls of one render may produce


class TemplateRaised(TemplateError):
    """The template called ``raise_exception``: it rejects the conversation."""


class _Runaway(TemplateError):
    """The template tried to produce more than the limits allow."""


class _GenerationBlock(Extension):
    """``{% generation %}...{% endgeneration %}``: transformers marks assistant tokens with it; here it renders its
    body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # jinja2 returns an Undefined that only fails when used further ({{ x.__class__ }} would print ""); a
        # template that reaches for internals is refused at once
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        # size-check repetition and powers before computing them ('x' * 10**12 would exhaust memory first)
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_RENDER_CHARS:
                    raise _Runaway(f"repeating a sequence of {len(seq)} items {n} times")
        elif operator == "**" and isinstance(right, int) and abs(right) > 4096:
            raise _Runaway(f"raising to the power {right}")
        return super().call_binop(context, operator, left, right)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers' tojson: plain json.dumps, no HTML escaping (jinja's own would turn < into \u003c)
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _GenerationBlock],
                   undefined=jinja2.Undefined, autoescape=False)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _environment()


class _RangeBudget:
    """``range`` for one render: the sandbox caps each call at 100,000 items, this caps them all together."""

    def __init__(self) -> None:
        self.left = MAX_RANGE_ITEMS

    def __call__(self, *args: int) -> range:
        r = range(*args)
        self.left -= len(r)
        if len(r) > 100_000 or self.left < 0:
            raise _Runaway(f"range{args} over the budget of {MAX_RANGE_ITEMS} items")
        return r


class ChatTemplate:
    """A model's chat template: ``render(messages)`` gives the prompt text; ``stop_tokens`` the texts that end an
    assistant turn."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "",
                 special_tokens: Mapping[str, str] | None = None, stop_tokens: Iterable[str] | None = None,
                 origin: str = "chat template") -> None:
        self.source = source
        self.origin = origin
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._special = {"bos_token": bos_token, "eos_token": eos_token, **(special_tokens or {})}
        try:
            self._template = _ENV.from_string(source)
        except TemplateSyntaxError as e:
            raise ModelFileError(f"{origin}: the chat template does not parse (line {e.lineno}: {e.message})",
                                 key="tokenizer.chat_template") from None
        self.stop_tokens: list[str] = list(stop_tokens) if stop_tokens is not None else turn_end_tokens(
            source, eos_token)

    # --- construction ----------------------------------------------------------------------------------------------
    @classmethod
    def from_string(cls, source: str, bos_token: str = "", eos_token: str = "", **special_tokens: str
                    ) -> "ChatTemplate":
        return cls(source, bos_token=bos_token, eos_token=eos_token, special_tokens=special_tokens)

    @classmethod
    def from_gguf(cls, model: "ModelFile", name: str | None = None) -> "ChatTemplate":
        """The file's ``tokenizer.chat_template`` (or ``tokenizer.chat_template.<name>``), with its BOS/EOS texts."""
        key = "tokenizer.chat_template" + (f".{name}" if name else "")
        meta = model.metadata
        source = meta.get(key)
        if not isinstance(source, str) or not source.strip():
            raise ModelFileError(f"{model.path}: the file has no chat template ({key!r} is missing); send a plain "
                                 "prompt instead of messages", key=key)
        tokens = meta.get("tokenizer.ggml.tokens") or []

        def text(role_key: str) -> str:
            i = meta.get(f"tokenizer.ggml.{role_key}")
            return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else ""

        special = {f"{r}_token": t for r, k in (("unk", "unknown_token_id"), ("pad", "padding_token_id"))
                   if (t := text(k))}
        eos = text("eos_token_id")
        known = set(tokens)
        stops = [t for t in turn_end_tokens(source, eos) if t in known]
        return cls(source, bos_token=text("bos_token_id"), eos_token=eos, special_tokens=special, stop_tokens=stops,
                   origin=f"{model.path}: {key}")

    @classmethod
    def from_hf_config(cls, path: str | Path) -> "ChatTemplate":
        """The template of a Hugging Face tokenizer directory (``chat_template.jinja`` or ``tokenizer_config.json``),
        for ``--tokenizer PATH``."""
        path = Path(path)
        directory = path if path.is_dir() else path.parent
        config: dict[str, Any] = {}
        if (directory / "tokenizer_config.json").is_file():
            config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
        source = config.get("chat_template")
        if (directory / "chat_template.jinja").is_file():
            source = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(source, list):  # named templates: take the default one
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        if not isinstance(source, str):
            raise ModelFileError(f"{directory}: no chat template in tokenizer_config.json or chat_template.jinja",
                                 path=str(directory))

        def token(role: str) -> str:
            entry = config.get(f"{role}_token")
            return (entry.get("content", "") if isinstance(entry, dict) else entry) or ""

        special = {f"{r}_token": t for r in ("unk", "pad") if (t := token(r))}
        return cls(source, bos_token=token("bos"), eos_token=token("eos"), special_tokens=special,
                   origin=f"{directory}: chat template")

    # --- rendering -------------------------------------------------------------------------------------------------
    def render(self, messages: list[Mapping[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text for ``messages`` (dicts with ``role`` and ``content``, ...). ``extra`` reaches the template
        as variables (``tools``, ``reasoning_effort``, ``strftime_now``, ...). Keys whose value is None are left out
        of each message, as if absent (templates test ``"tool_calls" in message``)."""
        context: dict[str, Any] = {
            **self._special,
            "messages": _plain_messages(messages),
            "add_generation_prompt": add_generation_prompt,
            "tools": None,
            "range": _RangeBudget(),
            **extra,
        }
        try:
            out: list[str] = []
            size = 0
            for chunk in self._template.generate(**context):
                size += len(chunk)
                if size > MAX_RENDER_CHARS:
                    raise _Runaway(f"output over {MAX_RENDER_CHARS} characters")
                out.append(chunk)
            return "".join(out)
        except TemplateRaised as e:
            raise InvalidRequest(f"the chat template rejects these messages: {e.message}", field="messages") from None
        except SecurityError as e:
            raise ModelFileError(f"{self.origin}: the chat template tried something the sandbox forbids ({e}); the "
                                 "template is unsafe or broken", key="tokenizer.chat_template") from None
        except (_Runaway, OverflowError, RecursionError, MemoryError) as e:
            raise ModelFileError(f"{self.origin}: the chat template runs away ({type(e).__name__}: {e})",
                                 key="tokenizer.chat_template") from None
        except Exception as e:  # UndefinedError, TypeError, ...: messages the template cannot handle
            raise InvalidRequest(f"the chat template cannot render these messages ({type(e).__name__}: {e})",
                                 field="messages") from None

    def __repr__(self) -> str:
        return f"ChatTemplate({self.origin!r}, stop_tokens={self.stop_tokens!r})"


def turn_end_tokens(source: str, eos_token: str = "") -> list[str]:
    """The texts that end an assistant turn for a template: the turn-end markers it writes, and EOS. In harmony,
    ``<|end|>`` closes a message inside a turn (the turn ends with ``<|return|>`` or ``<|call|>``)."""
    found = [t for t in TURN_END_TEXTS if t in source]
    if eos_token and eos_token not in found:
        found.append(eos_token)
    if "<|return|>" in found and "<|call|>" in found and "<|end|>" in found:
        found.remove("<|end|>")
    return found


def _plain_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, (list, tuple)):
        raise InvalidRequest("messages must be a list of {role, content} objects", field="messages")
    plain = []
    for i, m in enumerate(messages):
        if hasattr(m, "model_dump"):
            m = m.model_dump()
        if not isinstance(m, Mapping):
            raise InvalidRequest(f"messages[{i}] is a {type(m).__name__}, not an object", field=f"messages[{i}]")
        plain.append({k: v for k, v in m.items() if v is not None})
    return plain


# --- harmony ---------------------------------------------------------------------------------------------------------
_HARMONY_END = re.compile(r"<\|(?:end|return|call)\|>")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")


def split_harmony_channels(text: str) -> dict[str, Any]:
    """Split a harmony completion (what GPT-OSS generates after ``<|start|>assistant``, decoded with its special
    tokens) into channels.

    Returns ``{"analysis": str, "commentary": str, "final": str, "tool_calls": [...]}``: each channel's messages
    joined by newlines, and the messages addressed to a tool (``to=functions.name``) as ``{"recipient",
    "content_type", "arguments"}``. Text with no harmony markup is all ``final``; an unfinished message counts up to
    where the text stops."""
    result: dict[str, Any] = {"analysis": [], "commentary": [], "final": [], "tool_calls": []}
    if "<|message|>" not in text and "<|channel|>" not in text:
        return {"analysis": "", "commentary": "", "final": text.strip(), "tool_calls": []}
    for chunk in text.split("<|start|>"):
        if "<|message|>" not in chunk:
            continue  # a bare role header or an unfinished one
        header, body = chunk.split("<|message|>", 1)
        end = _HARMONY_END.search(body)
        if end:
            body = body[: end.start()]
        _role, _, rest = header.partition("<|channel|>")
        channel_words = rest.replace("<|constrain|>", " ").split()
        name = channel_words[0] if channel_words else "final"
        recipient = _RECIPIENT.search(header)
        if recipient:
            content_type = next((w for w in channel_words[1:] if not w.startswith("to=")), "json")
            result["tool_calls"].append(
                {"recipient": recipient.group(1), "content_type": content_type, "arguments": body}
            )
            continue
        result.setdefault(name, []).append(body)
    return {k: v if k == "tool_calls" else "\n".join(v) for k, v in result.items()}
