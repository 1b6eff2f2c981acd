"""Writes a Triton model-repository entry: config.pbtxt and the few-line 1/model.py.

The tensors come from their one declaration (python_backend/tensors.py). Engine settings go in as
`parameters`, so an operator can change them at load time through Triton's model-control API
without a rebuild.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from python_backend.tensors import INPUTS, OUTPUTS, TensorSpec

MODEL_PY = '''"""Triton loads this file; the model itself is FastServe's Python backend."""

from python_backend.model import TritonPythonModel  # noqa: F401
'''


@dataclass
class EntrySettings:
    """What config.pbtxt says about one generate model."""

    name: str
    device: str = "cpu"  # cpu | gpu
    instances: int = 1
    gpus: list[int] = field(default_factory=list)
    max_batch_size: int = 64
    max_queue_delay_us: int = 100
    parameters: dict[str, str] = field(default_factory=dict)


def _tensor(t: TensorSpec) -> str:
    optional = " optional: true" if t.optional else ""
    return f"  {{ name: {_quote(t.name)} data_type: {t.data_type} dims: {_dims(t.dims)}{optional} }}"


def _dims(dims) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def _quote(value: str) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def atomic_write(path: Path, text: str) -> None:
    """Write a file so that a reader sees the old content or the new, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, prefix=f".{path.name}.") as f:
        f.write(text)
    Path(f.name).chmod(0o644)
    Path(f.name).replace(path)


def render_config(
    s: EntrySettings, inputs: tuple[TensorSpec, ...] = INPUTS, outputs: tuple[TensorSpec, ...] = OUTPUTS
) -> str:
    """config.pbtxt text for a decoupled Python-backend model: a generate model, or a pool with its
    own tensors."""
    lines = [
        "# Written by FastServe's builder; engine settings below can be overridden at load time.",
        f"name: {_quote(s.name)}",
        'backend: "python"',
        f"max_batch_size: {s.max_batch_size}",
        "model_transaction_policy { decoupled: true }",
        f"dynamic_batching {{ max_queue_delay_microseconds: {s.max_queue_delay_us} }}",
        "input [",
    ]
    lines += [",\n".join(_tensor(t) for t in inputs), "]", "output ["]
    lines += [",\n".join(_tensor(t) for t in outputs), "]"]
    kind = "KIND_GPU" if s.device == "gpu" else "KIND_CPU"
    group = f"  {{ kind: {kind} count: {s.instances}"
    if s.device == "gpu" and s.gpus:
        group += f" gpus: {_dims(s.gpus)}"
    lines += ["instance_group [", group + " }", "]"]
    for key, value in sorted(s.parameters.items()):
        lines.append(f"parameters {{ key: {_quote(key)} value: {{ string_value: {_quote(value)} }} }}")
    return "\n".join(lines) + "\n"
