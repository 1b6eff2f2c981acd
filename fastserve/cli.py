"""The `fastserve` command: one entry point whose subcommands live with the code they drive."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _serve(args: argparse.Namespace) -> int:
    from python_backend.serve import TritonServer, serve_forever

    server = TritonServer(
        repository=Path(args.repository),
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        binary=args.tritonserver,
        log_verbose=args.log_verbose,
    )
    return serve_forever(server, timeout=args.timeout)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start Triton Inference Server on a model repository")
    p.add_argument("--repository", default="model_repository", help="model repository folder")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--tritonserver", default=None, help="path of a tritonserver binary to use")
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server to be ready")
    p.set_defaults(func=_serve)


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
