"""Every engine and model setting, declared once.

Each setting is a field of EngineConfig (the engine's) or ServingConfig (the Triton model's around
it), with its default, its allowed values and a one-line help. Everything else is derived from these
declarations: the builder's flags (`--kv-block-size`), the `parameters` config.pbtxt carries
(`kv_block_size`), the strict parser that reads them back, and the table in docs/settings.md
(`python -m python_backend.engine.config > docs/settings.md`). One name, one default, one parser.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def setting(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    minimum: float | None = None,
    written: bool = False,
) -> Any:
    """A dataclass field that is also a setting. `written`: the builder always puts it in config.pbtxt
    (other settings appear there only when set to something other than their default)."""
    meta = {"help": help, "choices": choices, "minimum": minimum, "written": written}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(slots=True)
class EngineConfig:
    """The engine's settings: how it loads the model, sizes the KV cache, batches and schedules."""

    device: str = setting(
        "cpu", "where the engine runs: cpu, gpu (the first CUDA device), cuda or cuda:N", written=True
    )
    dtype: str = setting(
        "auto",
        "weights and KV cache type; auto: as the engine folder was built (the builder picks bfloat16 "
        "for gpu, float32 for cpu)",
        choices=("auto", "float32", "bfloat16", "float16"),
        written=True,
    )
    max_model_len: int = setting(0, "context length in tokens; 0: the model's own", minimum=0)
    kv_cache_dtype: str = setting(
        "auto",
        "KV cache storage: auto (the weights' dtype), or int8 / fp8 (E4M3) codes with a float16 scale per "
        "token and head, about twice the tokens in the same memory",
        choices=("auto", "int8", "fp8"),
    )
    kv_block_size: int = setting(16, "tokens per KV-cache block", minimum=1, written=True)
    num_kv_blocks: int = setting(0, "KV-cache blocks; 0: as many as the memory settings allow", minimum=0)
    kv_cache_memory_fraction: float = setting(
        0.9, "gpu: share of the device's memory for weights and KV cache together", minimum=0.0, written=True
    )
    kv_cache_gb: float = setting(2.0, "cpu: memory for the KV cache, in GiB", minimum=0.0, written=True)
    max_num_seqs: int = setting(64, "sequences in one engine step", minimum=1, written=True)
    max_num_batched_tokens: int = setting(
        2048, "tokens in one engine step (prefill chunks included)", minimum=1, written=True
    )
    max_queue_size: int = setting(
        1024, "requests queued or running before new ones are refused with UNAVAILABLE", minimum=1, written=True
    )
    scheduler: str = setting(
        "fcfs",
        "fcfs: first come, first served; mlfq: skip-join multi-level feedback queue with KV swapping",
        choices=("fcfs", "mlfq"),
        written=True,
    )
    mlfq_levels: int = setting(0, "mlfq: number of queues; 0: enough to span 64 decode steps", minimum=0)
    mlfq_base_quantum_s: float = setting(
        0.0, "mlfq: the top queue's quantum in seconds; 0: from the start-up profile", minimum=0.0
    )
    mlfq_ratio: float = setting(2.0, "mlfq: quantum growth from one queue to the next", minimum=1.0)
    mlfq_starvation_s: float = setting(
        30.0, "mlfq: seconds without running before a job returns to the top queue", minimum=0.0
    )
    mlfq_senior_s: float = setting(
        0.0, "mlfq: seconds in the system after which a job runs ahead of the queues; 0: off", minimum=0.0
    )
    swap_space_gb: float = setting(4.0, "mlfq: host memory for swapped-out KV blocks, in GiB", minimum=0.0)
    enable_prefix_caching: bool = setting(True, "share the KV blocks of a common prompt prefix between requests")
    runner: str = setting(
        "auto",
        "what runs the model: pytorch (the paged KV cache, and on GPUs our kernels and CUDA graphs), "
        "onnxruntime (the entry's ONNX graph on the CPU) or tensorrt (its TensorRT engine); auto: "
        "the backend the entry was built for",
        choices=("auto", "pytorch", "onnxruntime", "tensorrt"),
    )
    kernels: bool = setting(True, "gpu: FastServe's Triton attention and fused decode kernels")
    cuda_graphs: bool = setting(True, "gpu: run decode steps as CUDA graphs")
    decode_gemv: bool = setting(True, "gpu: time the GEMV kernel against cuBLAS at start-up for 1-4 rows")
    sparse_kernels: bool = setting(
        False,
        "gpu: a 2:4-pruned model's projections run on PyTorch's semi-structured sparse kernels (off by "
        "default: their kernels beat dense ones only from thousands of rows, and each eager call costs "
        "about 0.5 ms of set-up on the host)",
    )
    sparse_min_rows: int = setting(
        256,
        "gpu, 2:4 sparse kernels: steps of fewer tokens use the dense weights, kept beside the sparse ones; "
        "0: every step sparse and no dense copy",
        minimum=0,
    )
    max_graph_batch: int = setting(256, "gpu: the largest decode batch run as a CUDA graph", minimum=1)
    capture_graphs_at_start: bool = setting(True, "gpu: capture every decode graph before serving")
    run_ahead: str = setting(
        "auto",
        "launch the next decode step before reading this one's tokens; auto: on gpu",
        choices=("auto", "on", "off"),
    )
    tensor_parallel: int = setting(
        1,
        "ranks the model is split over (attention by KV heads, the MLP by channels, the LM head by "
        "vocabulary), one process each; cpu: gloo, the host's threads shared among the ranks",
        minimum=1,
    )
    num_threads: int = setting(0, "cpu: threads for PyTorch; 0: PyTorch's default", minimum=0)
    cpu_take_turns: bool = setting(
        True,
        "cpu: engines on this host run their steps one at a time instead of oversubscribing the cores "
        "(turn off for engines pinned to cores of their own)",
    )
    seed: int = setting(0, "seed of the sampler for requests without their own", minimum=0)

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> EngineConfig:
        """From config.pbtxt parameters; keys of other settings are left to their owners."""
        return _from_strings(cls, params)


@dataclass(slots=True)
class ServingConfig:
    """The Triton model's settings around the engine."""

    engine_dir: str = setting("engine", "the engine folder, relative to the model version's folder", written=True)
    engine_process: bool = setting(
        True, "run the engine in a process of its own, off the Triton stub's interpreter lock", written=True
    )
    stream_interval: int = setting(
        1, "streaming: one response per this many tokens (fewer sends at high concurrency)", minimum=1, written=True
    )
    engine_restarts: int = setting(
        5, "engine process: attempts to start a new one after it dies, with backoff, before giving up", minimum=0
    )

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> ServingConfig:
        return _from_strings(cls, params)


@dataclass(slots=True)
class BuildConfig:
    """What the builder does to the weights. Recorded in engine.json, not in config.pbtxt: changing
    one means a rebuild."""

    quantize: str = setting(
        "none",
        "weights: int8 (per channel), int4 (grouped, AWQ), fp8 (E4M3, GPUs with FP8), gguf (a GGUF "
        "file's own Q4_0/Q4_1 blocks, exactly); none keeps them dense",
        choices=("none", "int8", "int4", "fp8", "gguf"),
    )
    group_size: int = setting(
        128,
        "int4: weights per scale along the input; an input size it does not divide takes the largest "
        "power of two that does",
        minimum=16,
    )
    symmetric: bool = setting(False, "int4: codes centred on zero, without a fitted offset per group")
    awq: bool = setting(True, "int4: activation-aware scales, searched on calibration text")
    quantize_lm_head: bool = setting(
        True, "int8, int4, fp8: quantize the output projection too (the embedding keeps its dense copy)"
    )
    fp8_scales: str = setting(
        "channel", "fp8: a weight scale per output channel or per tensor", choices=("channel", "tensor")
    )
    dense_layers: int = setting(
        0,
        "int8, int4, fp8: keep this many decoder layers dense, those whose rounding moves the model's "
        "next-token distributions most on calibration text",
        minimum=0,
    )
    prune: str = setting(
        "none",
        "weights: magnitude (the smallest |w| of each projection zeroed), 2:4 (two of every four along "
        "the input zeroed, the pattern sparse tensor cores take), structured (query heads and FFN "
        "channels removed by their importance on calibration text: a smaller model); none keeps them",
        choices=("none", "magnitude", "2:4", "structured"),
    )
    sparsity: float = setting(
        0.5,
        "magnitude: the share of projection weights zeroed; structured: the share of query heads per "
        "KV group and of FFN channels removed; in [0, 1)",
        minimum=0.0,
    )
    recover_steps: int = setting(
        0, "after pruning: steps of fine-tuning on calibration text to recover quality (0: none)", minimum=0
    )
    recover_distill: bool = setting(
        True, "the recovery step learns the unpruned model's next-token distributions, not the text alone"
    )
    calibration_tokens: int = setting(
        4096, "int4 with awq, structured pruning, recovery: tokens of calibration text", minimum=64
    )
    backend: str = setting(
        "pytorch",
        "what serves the entry: pytorch (the weights as safetensors); onnx (also the decoder as an ONNX "
        "graph with its KV cache as inputs and outputs, checked against PyTorch with polygraphy, served by "
        "ONNX Runtime); tensorrt (also a TensorRT engine built from that graph; needs TensorRT)",
        choices=("pytorch", "onnx", "tensorrt"),
    )
    int8_activations: bool = setting(
        True,
        "onnx with int8 or int4 weights: the served graph rounds each block of activations to int8 before "
        "the product (ONNX Runtime's fast CPU kernels, about twice the single-stream speed, with a small "
        "drift in greedy answers); --no-int8-activations keeps float32 products, the weights' own answers",
    )
    evaluate: bool = setting(
        False, "after the build, run `fastserve evaluate` on it and store the result in engine.json"
    )


CONFIGS: tuple[type, ...] = (EngineConfig, ServingConfig, BuildConfig)
PARAMETER_CONFIGS: tuple[type, ...] = (EngineConfig, ServingConfig)  # those config.pbtxt carries


@dataclass(frozen=True)
class Setting:
    """One setting as the builder, config.pbtxt and the docs see it."""

    name: str
    kind: type
    default: Any
    help: str
    choices: tuple[str, ...] | None
    minimum: float | None
    written: bool
    owner: type

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def settings() -> list[Setting]:
    """Every setting, in declaration order."""
    out = []
    for owner in CONFIGS:
        for f in dataclasses.fields(owner):
            kind = _TYPES[f.type] if isinstance(f.type, str) else f.type
            m = f.metadata
            out.append(Setting(f.name, kind, f.default, m["help"], m["choices"], m["minimum"], m["written"], owner))
    return out


RENAMED = {"scheduler_policy": "scheduler"}  # older builders wrote these names


def check_keys(params: dict[str, str]) -> None:
    """Refuse a parameter no setting has (a typo would otherwise be ignored without a word). Upper-case
    keys are the Python backend's own (EXECUTION_ENV_PATH, FORCE_CPU_ONLY_INPUT_TENSORS) and pass."""
    known = {s.name for s in settings() if s.owner in PARAMETER_CONFIGS}
    unknown = sorted(k for k in params if k not in known and not k.isupper())
    if unknown:
        named = [f"{k} (now {RENAMED[k]})" if k in RENAMED else k for k in unknown]
        raise ValueError(
            f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(named)}; "
            f"the settings are listed in docs/settings.md"
        )


def parse_value(s: Setting, raw: str) -> Any:
    """A setting's value from its text, or a ValueError naming the key and what it takes."""
    text = raw.strip()
    if s.kind is bool:
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"parameter {s.name}={raw!r}: must be true or false")
    if s.kind is int:
        try:
            value: Any = int(text)
        except ValueError:
            raise ValueError(f"parameter {s.name}={raw!r}: must be a whole number") from None
    elif s.kind is float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"parameter {s.name}={raw!r}: must be a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"parameter {s.name}={raw!r}: must be a finite number")
    else:
        value = text
    check_value(s, value)
    return value


def check_value(s: Setting, value: Any) -> None:
    if s.choices is not None and value not in s.choices:
        raise ValueError(f"parameter {s.name}={value!r}: must be one of {', '.join(s.choices)}")
    if s.minimum is not None and value < s.minimum:
        raise ValueError(f"parameter {s.name}={value!r}: must be at least {s.minimum:g}")
    if s.name == "device" and not _is_device(value):
        raise ValueError(f"parameter device={value!r}: must be cpu, gpu, cuda or cuda:N")


def _is_device(value: str) -> bool:
    if value in ("cpu", "gpu", "cuda"):
        return True
    head, _, index = value.partition(":")
    return head == "cuda" and index.isdigit()


def _from_strings(cls: type, params: dict[str, str]) -> Any:
    values = {}
    for s in settings():
        if s.owner is cls and s.name in params and params[s.name] != "":
            values[s.name] = parse_value(s, params[s.name])
    return cls(**values)


def validate(config: Any) -> None:
    """Check a config built in Python (Engine.from_folder(dir, kv_block_size=...)) as strictly as text."""
    for s in settings():
        if s.owner is type(config):
            value = getattr(config, s.name)
            ok = isinstance(value, s.kind) and not (s.kind is int and isinstance(value, bool))
            if s.kind is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                raise ValueError(f"setting {s.name}={value!r}: must be {s.kind.__name__}")
            check_value(s, value)


def to_parameters(configs: list[Any]) -> dict[str, str]:
    """config.pbtxt parameters for these configs: the settings marked written, and every other one
    that differs from its default."""
    out = {}
    for config in configs:
        for s in settings():
            if s.owner is type(config):
                value = getattr(config, s.name)
                if s.written or value != s.default:
                    out[s.name] = format_value(value)
    return out


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def add_arguments(parser: argparse.ArgumentParser, owner: type) -> None:
    """One flag per setting of `owner`, named and documented from its declaration."""
    for s in settings():
        if s.owner is not owner:
            continue
        default = format_value(s.default)
        help_text = f"{s.help} (default: {default})"
        if s.kind is bool:
            parser.add_argument(
                s.flag, dest=s.name, action=argparse.BooleanOptionalAction, default=s.default, help=help_text
            )
        else:
            parser.add_argument(
                s.flag,
                dest=s.name,
                type=_arg_parser(s),
                default=s.default,
                help=help_text,
                metavar="|".join(s.choices) if s.choices else s.kind.__name__.upper(),
            )


def _arg_parser(s: Setting):
    def parse(text: str) -> Any:
        try:
            return parse_value(s, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = s.name
    return parse


def from_arguments(args: argparse.Namespace, owner: type) -> Any:
    return owner(**{s.name: getattr(args, s.name) for s in settings() if s.owner is owner})


def markdown() -> str:
    """docs/settings.md: every setting with its flag, default and meaning."""
    lines = [
        "# Settings",
        "",
        "Every engine and model setting has one name. The builder takes it as a flag "
        "(`python builders/build.py --kv-block-size 32`), writes it into the entry's `config.pbtxt` "
        "as a parameter (`kv_block_size`), and the engine reads it back from there; in Python it is the "
        "field of the same name (`Engine.from_folder(dir, kv_block_size=32)`). A parameter can be changed "
        "in `config.pbtxt`, or at load time through Triton's model-control API, without a rebuild. "
        "A value that does not parse, or a key no setting has, stops the model from loading with a "
        "message naming it.",
        "",
        "This file is generated: `python -m python_backend.engine.config > docs/settings.md`.",
        "",
    ]
    titles = {
        EngineConfig: "Engine (`EngineConfig`)",
        ServingConfig: "Triton model (`ServingConfig`)",
        BuildConfig: "Build (`BuildConfig`)",
    }
    notes = {
        BuildConfig: [
            "What the builder does to the weights. These are builder flags only: they are recorded in the "
            "engine folder's `engine.json`, not in `config.pbtxt`, and changing one means a rebuild.",
            "",
        ]
    }
    for owner in CONFIGS:
        lines += [
            f"## {titles[owner]}",
            "",
            *notes.get(owner, []),
            "| parameter | builder flag | type | default | meaning |",
            "|---|---|---|---|---|",
        ]
        for s in settings():
            if s.owner is owner:
                kind = " \\| ".join(s.choices) if s.choices else s.kind.__name__
                lines.append(f"| `{s.name}` | `{s.flag}` | {kind} | `{format_value(s.default)}` | {s.help} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(), end="")
