"""`fastserve generate`: one request from the command line, streamed or whole."""

from __future__ import annotations

import argparse
import json
import sys

from clients.client import Client, GenerateError


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="send one prompt to a running server")
    p.add_argument("prompt", help="the prompt (with --chat: the user's message)")
    p.add_argument("--url", default=None, help="server address (default localhost:8001 for grpc, :8000 for http)")
    p.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--stream", action="store_true", help="print text as it is made")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template on the server")
    p.add_argument("--system", default=None, help="a system message, with --chat")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    url = args.url or ("localhost:8001" if args.protocol == "grpc" else "localhost:8000")
    client = Client(url, args.protocol, args.model)
    prompt = args.prompt
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt = json.dumps(messages + [{"role": "user", "content": args.prompt}])
    kw = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    try:
        if args.stream:
            for piece in client.stream(prompt, args.max_tokens, stop=args.stop, chat=args.chat, **kw):
                print(piece, end="", flush=True)
            print()
        else:
            out = client.generate(prompt, args.max_tokens, stop=args.stop, chat=args.chat, **kw)
            print(out.text)
            print(
                f"[{out.finish_reason}; {out.num_input_tokens} prompt tokens, {out.num_output_tokens} new]",
                file=sys.stderr,
            )
    except GenerateError as e:
        print(f"fastserve generate: {e}", file=sys.stderr)
        return 1
    except ConnectionError as e:
        print(f"fastserve generate: cannot reach {url}: {e}", file=sys.stderr)
        return 1
    return 0
