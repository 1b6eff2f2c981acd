"""Writes a Triton model-repository entry: config.pbtxt and the few-line 1/model.py.

The tensor names and types are the convention in shared/ARCHITECTURE.md, which clients, genai-perf
and Triton's OpenAI frontend rely on. Engine settings go in as `parameters`, so an operator can
change them at load time through Triton's model-control API without a rebuild.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# (name, Triton type, dims, optional)
GENERATE_INPUTS: list[tuple[str, str, list[int], bool]] = [
    ("text_input", "TYPE_STRING", [1], False),
    ("max_tokens", "TYPE_INT32", [1], True),
    ("stream", "TYPE_BOOL", [1], True),
    ("temperature", "TYPE_FP32", [1], True),
    ("top_p", "TYPE_FP32", [1], True),
    ("top_k", "TYPE_INT32", [1], True),
    ("min_p", "TYPE_FP32", [1], True),
    ("min_tokens", "TYPE_INT32", [1], True),
    ("min_length", "TYPE_INT32", [1], True),
    ("seed", "TYPE_UINT64", [1], True),
    ("repetition_penalty", "TYPE_FP32", [1], True),
    ("presence_penalty", "TYPE_FP32", [1], True),
    ("frequency_penalty", "TYPE_FP32", [1], True),
    ("stop_words", "TYPE_STRING", [-1], True),
    ("exclude_input_in_output", "TYPE_BOOL", [1], True),
    ("sampling_parameters", "TYPE_STRING", [1], True),
    ("return_num_input_tokens", "TYPE_BOOL", [1], True),
    ("return_num_output_tokens", "TYPE_BOOL", [1], True),
    ("priority", "TYPE_INT32", [1], True),
]
GENERATE_OUTPUTS: list[tuple[str, str, list[int]]] = [
    ("text_output", "TYPE_STRING", [-1]),
    ("finish_reason", "TYPE_STRING", [1]),
    ("num_input_tokens", "TYPE_UINT32", [1]),
    ("num_output_tokens", "TYPE_UINT32", [1]),
]

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


def _dims(dims: list[int]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def _quote(value: str) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(s: EntrySettings) -> str:
    """config.pbtxt text for a decoupled Python-backend generate model."""
    lines = [
        "# Written by FastServe's builder; engine settings below can be overridden at load time.",
        f"name: {_quote(s.name)}",
        'backend: "python"',
        f"max_batch_size: {s.max_batch_size}",
        "model_transaction_policy { decoupled: true }",
        f"dynamic_batching {{ max_queue_delay_microseconds: {s.max_queue_delay_us} }}",
        "input [",
    ]
    inputs = [
        f"  {{ name: {_quote(n)} data_type: {t} dims: {_dims(d)}{' optional: true' if opt else ''} }}"
        for n, t, d, opt in GENERATE_INPUTS
    ]
    lines += [",\n".join(inputs), "]", "output ["]
    outputs = [f"  {{ name: {_quote(n)} data_type: {t} dims: {_dims(d)} }}" for n, t, d in GENERATE_OUTPUTS]
    lines += [",\n".join(outputs), "]"]
    kind = "KIND_GPU" if s.device == "gpu" else "KIND_CPU"
    group = f"  {{ kind: {kind} count: {s.instances}"
    if s.device == "gpu" and s.gpus:
        group += f" gpus: {_dims(s.gpus)}"
    lines += ["instance_group [", group + " }", "]"]
    for key, value in sorted(s.parameters.items()):
        lines.append(f"parameters {{ key: {_quote(key)} value: {{ string_value: {_quote(value)} }} }}")
    return "\n".join(lines) + "\n"
