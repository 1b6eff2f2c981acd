"""The whole path from Python: load → compress (quantize, prune, distill) → evaluate → build →
serve. Each step is also a command, and takes the same settings under the same names (a flag's
name with underscores: `--recover-steps 50` is `recover_steps=50`).

    from fastserve import api

    student = api.distill("smollm2", text="corpus.txt", out="students/half", steps=200)   # fastserve distill
    api.build("smollm2", "base", repository="models")                                     # fastserve build
    api.build("smollm2", "pruned", repository="models", prune="structured", sparsity=0.25, recover_steps=100)
    api.build(student, "half", repository="models", quantize="int4")
    print(api.evaluate("models/pruned", against="models/base"))                          # fastserve evaluate
    with api.serve("models") as server:                                                   # fastserve serve
        print(api.client(server, "half").generate("Hello"))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _flags(settings: dict[str, Any]) -> list[str]:
    argv = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list | tuple):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def build(model: str | Path, name: str, repository: str | Path = "model_repository", **settings: Any) -> Path:
    """Build a repository entry (as `fastserve build`); returns its folder. Raises BuildError or
    SourceError with the builder's message; an unknown setting raises TypeError."""
    import argparse

    from builders.build import add_build_arguments
    from builders.build import build as run_build

    parser = argparse.ArgumentParser(prog="fastserve.api.build", exit_on_error=False, add_help=False)
    add_build_arguments(parser)
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"unknown build settings: {', '.join(unknown)}")
    argv = ["--model", str(model), "--name", name, "--repository", str(repository), *_flags(settings)]
    try:
        args = parser.parse_args(argv)
    except argparse.ArgumentError as e:
        raise ValueError(str(e)) from e
    return run_build(args)


def distill(
    teacher: str | Path,
    text: str | Path,
    out: str | Path,
    student_layers: int | None = None,
    device: str = "cpu",
    **train: Any,
) -> Path:
    """Train a student (as `fastserve distill`); returns its Hugging Face folder. `train` takes the
    fields of builders.distill.TrainOptions (steps, batch_size, seq_len, lr, alpha, temperature, ...)."""
    from builders.distill import DistillOptions, TrainOptions
    from builders.distill import distill as run_distill

    opts = DistillOptions(str(teacher), Path(text), Path(out), student_layers, device, TrainOptions(**train))
    return run_distill(opts)


def evaluate(entry: str | Path, against: str | Path | None = None, **options: Any):
    """Perplexity, agreement with `against`, size and speed (as `fastserve evaluate`); `options`
    takes the fields of builders.evaluate.EvalOptions."""
    from builders.evaluate import EvalOptions
    from builders.evaluate import evaluate as run_evaluate

    return run_evaluate(entry, against, EvalOptions(**options))


def serve(repository: str | Path = "model_repository", **options: Any):
    """A Triton server on the repository, on free ports; `with api.serve(...) as server:` starts it
    and stops it (as `fastserve serve`, without the OpenAI API)."""
    from python_backend.serve import TritonServer, free_port

    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    return TritonServer(Path(repository), **{**ports, **options})


def client(server, model: str, protocol: str = "grpc"):
    """A client of one model on a running server (clients/client.py)."""
    from clients.client import Client

    return Client(server.grpc_url if protocol == "grpc" else server.http_url, protocol, model)
