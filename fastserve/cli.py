"""The `fastserve` command: one entry point whose subcommands live with the code they drive."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _front_settings(args: argparse.Namespace, triton_url: str):
    from frontend.app import FrontSettings
    from frontend.keys import load_keys

    try:
        keys = load_keys(args.api_key, args.api_key_file)
    except ValueError as e:
        raise SystemExit(f"fastserve: {e}") from None
    return FrontSettings(triton_url, keys, args.max_streams_per_key, args.max_body_bytes)


def _serve(args: argparse.Namespace) -> int:
    from python_backend.serve import TritonServer, serve_forever

    server = TritonServer(
        repository=Path(args.repository),
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        binary=args.tritonserver,
        log_verbose=args.log_verbose,
        host=args.host,
    )
    front = _front_settings(args, server.grpc_url)
    server.admin_key = front.keys[0] if front.keys else None
    return serve_forever(server, timeout=args.timeout, front=front, front_port=args.openai_port)


def _openai(args: argparse.Namespace) -> int:
    from frontend.server import run

    return run(_front_settings(args, args.triton_url), args.host, args.port, access_log=args.access_log)


def _add_front_options(p: argparse.ArgumentParser) -> None:
    from frontend import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_STREAMS_PER_KEY
    from frontend.keys import KEY_ENV

    p.add_argument(
        "--api-key",
        action="append",
        default=None,
        help=f"a key callers must send as 'Authorization: Bearer KEY' (repeatable; also ${KEY_ENV}, comma-separated)",
    )
    p.add_argument("--api-key-file", default=None, help="a file of keys, one per line")
    p.add_argument(
        "--max-streams-per-key",
        type=int,
        default=DEFAULT_MAX_STREAMS_PER_KEY,
        help="concurrent OpenAI requests per key (429 beyond)",
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="largest OpenAI request body (413 beyond)"
    )


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from frontend import DEFAULT_PORT

    p = sub.add_parser("serve", help="start Triton Inference Server on a model repository, and the OpenAI API")
    p.add_argument("--repository", default="model_repository", help="model repository folder")
    p.add_argument("--host", default=None, help="the address every endpoint listens on (default: all)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--openai-port", type=int, default=DEFAULT_PORT, help="OpenAI-compatible API; 0 turns it off")
    _add_front_options(p)
    p.add_argument("--tritonserver", default=None, help="path of a tritonserver binary to use")
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server to be ready")
    p.set_defaults(func=_serve)
    p = sub.add_parser("openai", help="the OpenAI-compatible API in front of a Triton server running elsewhere")
    p.add_argument("--triton-url", default="localhost:8001", help="the Triton server's gRPC address")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--access-log", action="store_true", help="log every request (never its key)")
    _add_front_options(p)
    p.set_defaults(func=_openai)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastserve", description="Fast LLM serving on Triton Inference Server")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    from builders.build import add_build_parser

    add_build_parser(sub)
    from builders.pool import add_pool_parser

    add_pool_parser(sub)
    from builders.evaluate import add_evaluate_parser

    add_evaluate_parser(sub)
    from builders.distill import add_distill_parser

    add_distill_parser(sub)
    from benchmarks.bench import add_bench_parser

    add_bench_parser(sub)
    from clients.cli import add_generate_parser

    add_generate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
