"""``orcd generate``: load a model, generate from one prompt, print the text on stdout as it comes.

Only the generated text goes to stdout (timings and logs go to stderr), so the output can be piped; ``--json``
prints one object with the prompt's and the generated token ids, the text and the finish reason instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid


def add_parser(sub: argparse._SubParsersAction) -> None:
    from orcd.device import MATMUL_PRECISION_HELP, MATMUL_PRECISIONS

    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("--model", required=True, metavar="FILE", help="path to a .gguf model")
    p.add_argument("--tokenizer", metavar="PATH", default=None,
                   help="a Hugging Face tokenizer.json (or its directory) to use instead of the GGUF's vocabulary")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--max-tokens", type=int, default=128, metavar="N", help="tokens to generate at most (128)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, metavar="K", help="0 turns it off (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, metavar="P", help="1 turns it off (default 0.95)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="seed for a reproducible run")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the first GPU, else cpu)")
    p.add_argument("--n-ctx", type=int, default=None, metavar="N",
                   help="context to allocate (default: prompt + max tokens, at most the model's context)")
    p.add_argument("--matmul-precision", choices=MATMUL_PRECISIONS, default="highest", help=MATMUL_PRECISION_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming the text")
    p.add_argument("prompt", metavar="PROMPT")
    p.set_defaults(run=run)


def prompt_ids(loaded, text: str, chat: bool) -> list[int]:
    """Token ids of the prompt: as is (BOS as the vocabulary asks), or rendered by the chat template."""
    from orcd.errors import InvalidRequest

    tok = loaded.tokenizer
    if chat:
        if loaded.chat_template is None:
            raise InvalidRequest("this model file has no chat template; run without --chat", field="chat")
        return tok.encode_chat(loaded.chat_template.render([{"role": "user", "content": text}], True))
    return tok.encode(text, add_special=True, parse_special=True)


def run(args: argparse.Namespace) -> int:
    from orcd.device import set_matmul_precision
    from orcd.engine import Engine, FinishEvent, GenerationRequest
    from orcd.errors import InvalidRequest
    from orcd.loader import load_model
    from orcd.plugins import get_plugin_manager
    from orcd.sampling import SamplingParams

    if args.max_tokens < 1:
        raise InvalidRequest("--max-tokens must be at least 1", field="max_tokens")
    try:
        sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as e:
        raise InvalidRequest(f"invalid sampling option: {e}") from None
    set_matmul_precision(args.matmul_precision)
    plugins = get_plugin_manager()
    loaded = load_model(args.model, device=args.device, plugins=plugins, tokenizer_path=args.tokenizer,
                        progress=lambda pct, msg: print(f"[{pct:3d}%] {msg}", file=sys.stderr))
    ids = prompt_ids(loaded, args.prompt, args.chat)
    n_ctx = args.n_ctx or min(loaded.config.context_length, len(ids) + args.max_tokens)
    engine = Engine(loaded, plugins, max_batch=1, n_ctx=n_ctx)
    request = GenerationRequest(request_id=uuid.uuid4().hex, prompt_ids=ids, max_tokens=args.max_tokens,
                                sampling=sampling)
    generated: list[int] = []
    text: list[str] = []
    finish: FinishEvent | None = None
    for event in engine.generate(request):
        if isinstance(event, FinishEvent):
            finish = event
            break
        generated.append(event.token_id)
        text.append(event.text)
        if not args.json and event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    assert finish is not None
    if finish.error is not None:
        raise finish.error
    if args.json:
        print(json.dumps({"prompt_ids": ids, "token_ids": generated, "text": "".join(text),
                          "finish_reason": finish.reason, "seed": finish.seed}, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
    rate = ""
    if finish.decode_time_s and finish.completion_tokens > 1:
        rate = f", {(finish.completion_tokens - 1) / finish.decode_time_s:.1f} tokens/s"
    ttft = f"{finish.time_to_first_token_s * 1000:.0f} ms" if finish.time_to_first_token_s is not None else "-"
    seed = f", seed {finish.seed}" if finish.seed is not None else ""
    print(f"{finish.prompt_tokens} prompt tokens, {finish.completion_tokens} generated ({finish.reason}); "
          f"first token after {ttft}{rate}{seed}", file=sys.stderr)
    return 0
