"""``orcd tokenize``: the token ids of a text under a model's vocabulary, as a JSON list (like llama.cpp's
``llama-tokenize``: special-token text becomes special tokens unless ``--no-special``; no BOS unless
``--add-bos``). Reads the vocabulary only; the weights are not loaded."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenize", help="print the token ids of a text as a JSON list")
    p.add_argument("--model", required=True, metavar="FILE", help="path to a .gguf model")
    p.add_argument("--tokenizer", metavar="PATH", default=None,
                   help="a Hugging Face tokenizer.json (or its directory) to use instead of the GGUF's vocabulary")
    p.add_argument("--no-special", action="store_true", help="treat special-token text as plain text")
    p.add_argument("--add-bos", action="store_true", help="start with the BOS token")
    p.add_argument("text", metavar="TEXT")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from orcd.errors import InvalidRequest
    from orcd.loader import load_tokenizer
    from orcd.modelfile import ModelFile

    tok = load_tokenizer(ModelFile.open(args.model), args.tokenizer)
    ids = tok.encode(args.text, add_special=False, parse_special=not args.no_special)
    if args.add_bos:
        if tok.bos_id is None:
            raise InvalidRequest(f"{args.model}: the vocabulary has no BOS token", field="add_bos")
        ids = [tok.bos_id, *ids]
    print(json.dumps(ids))
    return 0
