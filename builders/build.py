"""Build a Triton model-repository entry from a Hugging Face model, a GGUF file or a hub id.

    python builders/build.py --model smollm2 --name smollm2 --repository model_repository
    fastserve build ...            (the same)

Writes <repository>/<name>/config.pbtxt, 1/model.py and the engine folder 1/engine/ (weights as
safetensors, config, tokenizer with chat template, engine.json). Every write is atomic: a failed or
interrupted build leaves the previous entry, or none, never a half-written folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python builders/build.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from builders.repository import MODEL_PY, EntrySettings, render_config  # noqa: E402
from builders.sources import SourceError, resolve  # noqa: E402
from fastserve import __version__  # noqa: E402

ENGINE_FORMAT_VERSION = 1
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


class BuildError(RuntimeError):
    pass


def _log(msg: str, start: float) -> None:
    print(f"[{time.monotonic() - start:7.1f}s] {msg}", flush=True)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, prefix=f".{path.name}.") as f:
        f.write(text)
    Path(f.name).replace(path)


def _replace_dir(new: Path, target: Path) -> None:
    """Put `new` where `target` is, so that a reader sees either the old folder or the new one."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{int(time.time() * 1e6)}")
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_settings(args: argparse.Namespace, dtype: str) -> dict:
    """The settings that shape the engine folder; a change in any of them means a rebuild."""
    return {
        "dtype": dtype,
        "max_model_len": args.max_model_len,
        "kv_block_size": args.kv_block_size,
        "max_batch_size": args.max_batch_size,
    }


def engine_parameters(args: argparse.Namespace, dtype: str) -> dict[str, str]:
    """Engine settings that config.pbtxt carries as parameters (changeable at load time)."""
    params = {
        "engine_dir": "engine",
        "device": args.device,
        "dtype": dtype,
        "scheduler_policy": args.scheduler,
        "kv_block_size": str(args.kv_block_size),
        "max_num_seqs": str(args.max_num_seqs),
        "max_num_batched_tokens": str(args.max_num_batched_tokens),
        "max_queue_size": str(args.max_queue_size),
        "stream_interval": str(args.stream_interval),
        "engine_process": "true" if args.engine_process else "false",
    }
    # the MLFQ's settings always: the policy can be switched at load time
    params.update(
        swap_space_gb=str(args.swap_space_gb),
        mlfq_levels=str(args.mlfq_levels),
        mlfq_base_quantum_s=str(args.mlfq_base_quantum),
        mlfq_ratio=str(args.mlfq_ratio),
        mlfq_starvation_s=str(args.mlfq_starvation),
        mlfq_senior_s=str(args.mlfq_senior),
    )
    if args.device == "gpu":
        params["kv_cache_memory_fraction"] = str(args.kv_cache_memory_fraction)
    else:
        params["kv_cache_gb"] = str(args.kv_cache_gb)
    if args.num_kv_blocks:
        params["num_kv_blocks"] = str(args.num_kv_blocks)
    return params


def _save_weights(model, folder: Path) -> None:
    """config.json, generation_config.json and model.safetensors in the layout transformers reads.

    Written by hand rather than with save_pretrained, which refuses models loaded from GGUF (it sees
    them as quantized even though transformers has dequantized them)."""
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(
        {k: v.detach().contiguous() for k, v in state.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )


def _write_engine(source, dtype: str, settings: dict, engine_tmp: Path, start: float) -> dict:
    import torch

    _log(f"loading {source.description} ({source.architecture}) as {dtype}", start)
    model, tokenizer = source.load(getattr(torch, dtype))
    config = model.config
    max_pos = int(getattr(config, "max_position_embeddings", 0) or 0)
    max_model_len = settings["max_model_len"] or max_pos or 4096
    if max_pos and max_model_len > max_pos:
        raise BuildError(f"--max-model-len {max_model_len} exceeds the model's max_position_embeddings {max_pos}")
    n_params = sum(p.numel() for p in model.parameters())
    _log(f"writing {n_params / 1e6:.1f}M parameters as safetensors", start)
    _save_weights(model, engine_tmp)
    tokenizer.save_pretrained(engine_tmp)
    if getattr(tokenizer, "chat_template", None) and not any(engine_tmp.glob("chat_template*")):
        (engine_tmp / "chat_template.jinja").write_text(tokenizer.chat_template)
    eos = model.generation_config.eos_token_id if model.generation_config else None
    eos_ids = sorted(
        {
            *(eos if isinstance(eos, list) else [eos] if eos is not None else []),
            *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []),
        }
    )
    return {
        "architecture": source.architecture,
        "num_parameters": n_params,
        "max_model_len": max_model_len,
        "eos_token_ids": eos_ids,
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }


def build(args: argparse.Namespace) -> Path:
    """Run one build; returns the entry folder."""
    start = time.monotonic()
    source = resolve(args.model)  # cheap checks first: files, architecture
    dtype = (
        DTYPES.get(args.dtype, None) if args.dtype != "auto" else ("bfloat16" if args.device == "gpu" else "float32")
    )
    if dtype is None:
        raise BuildError(f"--dtype {args.dtype}: choose one of auto, {', '.join(sorted(set(DTYPES.values())))}")
    if args.stream_interval < 1:
        raise BuildError(f"--stream-interval {args.stream_interval}: must be at least 1")
    repository = Path(args.repository)
    entry = repository / args.name
    version = entry / "1"
    engine_dir = version / "engine"
    settings = build_settings(args, dtype)
    created_entry = not entry.exists()
    entry_config = EntrySettings(
        name=args.name,
        device=args.device,
        instances=args.instances,
        gpus=args.gpus,
        max_batch_size=args.max_batch_size,
        parameters=engine_parameters(args, dtype),
    )
    try:
        _log(f"hashing {source.description}", start)
        source_hash = source.content_hash()
        meta_path = engine_dir / "engine.json"
        previous = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        unchanged = (
            previous
            and previous.get("source_hash") == source_hash
            and previous.get("build_settings") == settings
            and previous.get("format_version") == ENGINE_FORMAT_VERSION
        )
        if unchanged and not args.force:
            _log(f"engine in {engine_dir} is up to date (same source and settings); --force rebuilds it", start)
        else:
            version.mkdir(parents=True, exist_ok=True)
            engine_tmp = Path(tempfile.mkdtemp(prefix=".engine.tmp-", dir=version))
            try:
                info = _write_engine(source, dtype, settings, engine_tmp, start)
                meta = {
                    "format_version": ENGINE_FORMAT_VERSION,
                    "builder_version": __version__,
                    "architecture": info["architecture"],
                    "dtype": dtype,
                    "quantization": None,
                    "pruning": None,
                    "max_model_len": info["max_model_len"],
                    "kv_block_size": args.kv_block_size,
                    "max_batch_size": args.max_batch_size,
                    "eos_token_ids": info["eos_token_ids"],
                    "num_parameters": info["num_parameters"],
                    "has_chat_template": info["has_chat_template"],
                    "source": source.description,
                    "source_hash": source_hash,
                    "build_settings": settings,
                    "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
                (engine_tmp / "engine.json").write_text(json.dumps(meta, indent=2) + "\n")
                engine_tmp.chmod(0o755)  # mkdtemp makes it private; a container's server may run as another user
                for f in engine_tmp.iterdir():
                    f.chmod(0o644)
                _replace_dir(engine_tmp, engine_dir)
            finally:
                shutil.rmtree(engine_tmp, ignore_errors=True)
        _atomic_write(version / "model.py", MODEL_PY)
        _atomic_write(entry / "config.pbtxt", render_config(entry_config))
    except BaseException:
        if created_entry:
            shutil.rmtree(entry, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in engine_dir.rglob("*") if p.is_file())
    meta = json.loads((engine_dir / "engine.json").read_text())
    _log(
        f"done: {meta['architecture']}, {meta['num_parameters'] / 1e6:.1f}M parameters, {meta['dtype']}, "
        f"{size / 1e6:.1f} MB on disk in {entry}",
        start,
    )
    return entry


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model folder, GGUF file, hub id, or 'smollm2'")
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument("--repository", default="model_repository", help="model repository folder")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on gpu, float32 on cpu), float32, bfloat16, float16")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="where Triton runs the model")
    p.add_argument("--instances", type=int, default=1, help="model instances (instance_group count)")
    p.add_argument("--gpus", type=int, nargs="*", default=[], help="GPU ids for the instance group")
    p.add_argument("--max-model-len", type=int, default=0, help="context length (default: the model's)")
    p.add_argument("--kv-block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument("--num-kv-blocks", type=int, default=0, help="KV blocks (default: from memory)")
    p.add_argument("--kv-cache-memory-fraction", type=float, default=0.9, help="GPU memory share for weights+KV")
    p.add_argument("--kv-cache-gb", type=float, default=2.0, help="CPU memory for the KV pool (GiB)")
    p.add_argument("--max-batch-size", type=int, default=64, help="Triton max_batch_size")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences per engine step")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget per engine step")
    p.add_argument("--max-queue-size", type=int, default=1024, help="waiting requests before UNAVAILABLE")
    p.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="streaming: send one response per this many tokens (fewer sends at high concurrency)",
    )
    p.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the engine loop in a process of its own, off the Triton stub's interpreter lock "
        "(--no-engine-process: on a thread of the stub)",
    )
    p.add_argument(
        "--scheduler",
        choices=["fcfs", "mlfq"],
        default="fcfs",
        help="scheduling policy: fcfs, or mlfq (FastServe's skip-join MLFQ with KV swapping)",
    )
    p.add_argument("--swap-space-gb", type=float, default=4.0, help="mlfq: host memory for swapped-out KV (GiB)")
    p.add_argument(
        "--mlfq-levels",
        type=int,
        default=0,
        help="mlfq: number of queues (0: enough to span 128 decode steps, measured at start-up)",
    )
    p.add_argument(
        "--mlfq-base-quantum",
        type=float,
        default=0.0,
        help="mlfq: top queue's quantum in seconds (0: from the engine's start-up profile)",
    )
    p.add_argument("--mlfq-ratio", type=float, default=2.0, help="mlfq: quantum growth per queue")
    p.add_argument(
        "--mlfq-starvation",
        type=float,
        default=30.0,
        help="mlfq: seconds without running before a job returns to the top queue",
    )
    p.add_argument(
        "--mlfq-senior",
        type=float,
        default=0.0,
        help="mlfq: seconds in the system after which a job runs ahead of the queues until it ends (0: off)",
    )
    p.add_argument("--force", action="store_true", help="rebuild even when source and settings are unchanged")


def run(args: argparse.Namespace) -> int:
    try:
        build(args)
    except (SourceError, BuildError) as e:
        print(f"build failed: {e}", file=sys.stderr)
        return 2
    return 0


def add_build_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="build a Triton repository entry from a model")
    add_build_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build.py", description=__doc__.split("\n\n")[0])
    add_build_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
