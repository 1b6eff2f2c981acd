"""Build a Triton model-repository entry from a Hugging Face model, a GGUF file or a hub id.

    python builders/build.py --model smollm2 --name smollm2 --repository model_repository
    fastserve build ...            (the same)
    python builders/build.py --pool NAME --members a,b,c    (a pool of built entries: builders/pool.py)

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

from builders.repository import MODEL_PY, EntrySettings, atomic_write, render_config  # noqa: E402
from builders.sources import SourceError, resolve  # noqa: E402
from fastserve import __version__  # noqa: E402
from python_backend.engine import config  # noqa: E402
from python_backend.engine.config import BuildConfig, EngineConfig, ServingConfig  # noqa: E402

ENGINE_FORMAT_VERSION = 1


class BuildError(RuntimeError):
    pass


def _log(msg: str, start: float) -> None:
    print(f"[{time.monotonic() - start:7.1f}s] {msg}", flush=True)


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
    compress = config.from_arguments(args, BuildConfig)
    return {
        "dtype": dtype,
        "max_model_len": args.max_model_len,
        "kv_block_size": args.kv_block_size,
        "max_batch_size": args.max_batch_size,
        **{k: v for k, v in config.to_parameters([compress]).items() if k != "evaluate"},
    }


def check_compression(args: argparse.Namespace, source, on_gpu: bool) -> None:
    """Refuse a quantization or pruning request that cannot work before any weights are loaded."""
    if args.quantize == "gguf" and source.kind != "gguf":
        raise BuildError(f"--quantize gguf keeps a GGUF file's own 4-bit weights; {source.description} is not GGUF")
    if args.quantize == "int4" and args.group_size & (args.group_size - 1):
        raise BuildError(f"--group-size {args.group_size}: must be a power of two (32, 64, 128, ...)")
    if args.dense_layers and args.quantize not in ("int8", "int4", "fp8"):
        raise BuildError(
            f"--dense-layers keeps layers of an int8, int4 or fp8 build dense; --quantize is {args.quantize}"
        )
    if args.quantize == "fp8" and not on_gpu:
        raise BuildError("--quantize fp8 serves on GPUs with FP8 matrix units only; build it with --device gpu")
    if args.prune != "none":
        if not 0.0 <= args.sparsity < 1.0:
            raise BuildError(f"--sparsity {args.sparsity}: must be in [0, 1)")
        if args.quantize == "gguf":
            raise BuildError("--quantize gguf keeps the GGUF file's own 4-bit blocks; they cannot be pruned")
    if args.recover_steps:
        from builders.distill import DistillError, TrainOptions, check_train

        if args.prune == "none":
            raise BuildError("--recover-steps recovers a pruned model; give --prune too")
        try:
            check_train(TrainOptions(steps=args.recover_steps), args.calibration_tokens)
        except DistillError as e:
            raise BuildError(f"--recover-steps: {e} (raise --calibration-tokens)") from e


def engine_parameters(args: argparse.Namespace, dtype: str) -> dict[str, str]:
    """The settings config.pbtxt carries as parameters (changeable at load time)."""
    engine = config.from_arguments(args, EngineConfig)
    engine.dtype = dtype
    return config.to_parameters([engine, config.from_arguments(args, ServingConfig)])


def _save_weights(model, folder: Path, tensors: dict | None = None) -> None:
    """config.json, generation_config.json and model.safetensors in the layout transformers reads;
    `tensors` (a quantized build's codes and scales) in place of the model's own weights.

    Written by hand rather than with save_pretrained, which refuses models loaded from GGUF (it sees
    them as quantized even though transformers has dequantized them)."""
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    if tensors is None:
        state = model.state_dict()
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        tensors = {k: v.detach().contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _quantize(source, model, tokenizer, args: argparse.Namespace, dtype: str, start: float) -> tuple[dict, dict]:
    import torch

    from builders import quantize

    target = getattr(torch, dtype)
    if args.quantize == "gguf":
        _log("taking the GGUF file's 4-bit projections as they are", start)
        tensors, record = quantize.gguf_int4_tensors(source.location, model.config)
        covered = {name.rsplit(".", 1)[0] + ".weight" for name in tensors}  # biases stay dense
        for k, v in model.state_dict().items():
            if k not in covered and not (k == "lm_head.weight" and model.config.tie_word_embeddings):
                tensors[k] = v.detach().to(target).contiguous()
        record["lm_head"] = "dense"
        return tensors, record
    opts = quantize.QuantizeOptions(
        method=args.quantize,
        group_size=args.group_size,
        symmetric=args.symmetric,
        awq=args.awq,
        lm_head=args.quantize_lm_head,
        fp8_scales=args.fp8_scales,
        dense_layers=args.dense_layers,
    )
    _log(f"quantizing to {args.quantize}", start)
    return quantize.quantize_model(model, tokenizer, opts, target, args.calibration_tokens, lambda m: _log(m, start))


def _prune(model, tokenizer, args: argparse.Namespace, start: float) -> tuple:
    """The model pruned as asked (a new, smaller one for structured pruning), recovered by a short
    fine-tune where asked, and the record."""
    import copy

    from builders import prune
    from builders.text import token_ids

    opts = prune.PruneOptions(method=args.prune, sparsity=args.sparsity)
    needs_text = args.prune == "structured" or args.recover_steps
    try:
        ids, text = token_ids(tokenizer, "calibration", args.calibration_tokens) if needs_text else ([], None)
    except ValueError as e:
        raise BuildError(f"pruning failed: {e}") from e
    original = None  # the teacher of a distilled recovery: the model as it was before pruning
    if args.recover_steps and args.recover_distill:
        original = model if args.prune == "structured" else copy.deepcopy(model)  # structured builds anew
    if args.prune == "structured":
        try:
            model, record = prune.prune_structured(model, opts, ids, lambda m: _log(m, start))
        except ValueError as e:
            raise BuildError(f"pruning failed: {e}") from e
    else:
        _log(f"pruning: {args.prune}" + (f" to {args.sparsity:.0%}" if args.prune == "magnitude" else ""), start)
        record = prune.prune_weights(model, opts)
    if text is not None:
        record["calibration"] = text
    if args.recover_steps:
        record["recovery"] = _recover(model, original, ids, args, start)
    return model, record


def _recover(model, teacher, ids: list[int], args: argparse.Namespace, start: float) -> dict:
    """A bounded fine-tune of the pruned model on the calibration text; zeroed weights stay zero."""
    import torch

    from builders.distill import DistillError, TrainOptions, train

    masks = {}
    if args.prune != "structured":
        masks = {n: p != 0 for n, p in model.named_parameters() if n.endswith("proj.weight")}
    opts = TrainOptions(steps=args.recover_steps, alpha=0.5 if teacher is not None else 1.0, lr=1e-4)
    how = "distilling from the unpruned model" if teacher is not None else "on the text"
    _log(f"recovery: {args.recover_steps} steps {how}", start)
    try:
        history = train(model, teacher, torch.tensor(ids), opts, masks=masks, progress=False)
    except DistillError as e:
        raise BuildError(f"recovery failed: {e}") from e
    _log(f"recovery: loss {history[0].loss:.3f} -> {history[-1].loss:.3f}", start)
    return {
        "steps": args.recover_steps,
        "distilled": teacher is not None,
        "first_loss": history[0].loss,
        "final_loss": history[-1].loss,
    }


def _write_engine(source, dtype: str, args: argparse.Namespace, engine_tmp: Path, start: float) -> dict:
    import torch

    settings = build_settings(args, dtype)
    dense = args.quantize == "none" and args.prune == "none"
    load_as = dtype if dense else "float32"  # quantized and pruned from full precision
    _log(f"loading {source.description} ({source.architecture}) as {load_as}", start)
    model, tokenizer = source.load(getattr(torch, load_as))
    pruning = None
    if args.prune != "none":
        model, pruning = _prune(model, tokenizer, args, start)
        if args.quantize == "none":
            model.to(getattr(torch, dtype))
    config = model.config
    max_pos = int(getattr(config, "max_position_embeddings", 0) or 0)
    max_model_len = settings["max_model_len"] or max_pos or 4096
    if max_pos and max_model_len > max_pos:
        raise BuildError(f"--max-model-len {max_model_len} exceeds the model's max_position_embeddings {max_pos}")
    n_params = sum(p.numel() for p in model.parameters())
    quantization = None
    if args.quantize == "none":
        _log(f"writing {n_params / 1e6:.1f}M parameters as safetensors", start)
        _save_weights(model, engine_tmp)
    else:
        try:
            tensors, quantization = _quantize(source, model, tokenizer, args, dtype, start)
        except ValueError as e:
            raise BuildError(f"quantization failed: {e}") from e
        _log(f"writing {n_params / 1e6:.1f}M parameters, projections as {args.quantize}", start)
        _save_weights(model, engine_tmp, tensors)
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
        "quantization": quantization,
        "pruning": pruning,
        "tokenizer": tokenizer,
    }


def build(args: argparse.Namespace) -> Path:
    """Run one build; returns the entry folder."""
    start = time.monotonic()
    source = resolve(args.model)  # cheap checks first: files, architecture
    on_gpu = args.device != "cpu"
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    repository = Path(args.repository)
    entry = repository / args.name
    version = entry / "1"
    engine_dir = version / "engine"
    settings = build_settings(args, dtype)
    check_compression(args, source, on_gpu)
    from builders.graph import GraphBuildError, build_graphs, check_backend

    try:
        check_backend(args.backend, on_gpu, args.quantize, args.runner, dtype, args.int8_activations)
    except GraphBuildError as e:
        raise BuildError(str(e)) from e
    created_entry = not entry.exists()
    entry_config = EntrySettings(
        name=args.name,
        device="gpu" if on_gpu else "cpu",
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
                info = _write_engine(source, dtype, args, engine_tmp, start)
                meta = {
                    "format_version": ENGINE_FORMAT_VERSION,
                    "builder_version": __version__,
                    "architecture": info["architecture"],
                    "device": "gpu" if on_gpu else "cpu",
                    "dtype": dtype,
                    "quantization": info["quantization"],
                    "pruning": info["pruning"],
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
                if args.backend != "pytorch":
                    (engine_tmp / "engine.json").write_text(json.dumps(meta, indent=2) + "\n")
                    try:
                        meta["graph"] = build_graphs(
                            engine_tmp,
                            args.backend,
                            info["tokenizer"],
                            lambda m: _log(m, start),
                            args.max_num_seqs,
                            args.max_num_batched_tokens,
                            args.int8_activations,
                        )
                    except GraphBuildError as e:
                        raise BuildError(str(e)) from e
                (engine_tmp / "engine.json").write_text(json.dumps(meta, indent=2) + "\n")
                engine_tmp.chmod(0o755)  # mkdtemp makes it private; a container's server may run as another user
                for f in engine_tmp.iterdir():
                    f.chmod(0o644)
                _replace_dir(engine_tmp, engine_dir)
            finally:
                shutil.rmtree(engine_tmp, ignore_errors=True)
        atomic_write(version / "model.py", MODEL_PY)
        atomic_write(entry / "config.pbtxt", render_config(entry_config))
    except BaseException:
        if created_entry:
            shutil.rmtree(entry, ignore_errors=True)
        raise
    if args.evaluate:
        from builders.evaluate import evaluate_into_meta

        _log("evaluating the build (fastserve evaluate)", start)
        evaluate_into_meta(engine_dir, device="cuda" if on_gpu else "cpu")
    size = sum(p.stat().st_size for p in engine_dir.rglob("*") if p.is_file())
    meta = json.loads((engine_dir / "engine.json").read_text())
    quant = f" ({meta['quantization']['method']} weights)" if meta.get("quantization") else ""
    _log(
        f"done: {meta['architecture']}, {meta['num_parameters'] / 1e6:.1f}M parameters, {meta['dtype']}{quant}, "
        f"{size / 1e6:.1f} MB on disk in {entry}",
        start,
    )
    return entry


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model folder, GGUF file, hub id, or 'smollm2'")
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument("--repository", default="model_repository", help="model repository folder")
    p.add_argument("--instances", type=int, default=1, help="model instances (instance_group count)")
    p.add_argument("--gpus", type=int, nargs="*", default=[], help="GPU ids for the instance group")
    p.add_argument("--max-batch-size", type=int, default=64, help="Triton max_batch_size")
    p.add_argument("--force", action="store_true", help="rebuild even when source and settings are unchanged")
    engine = p.add_argument_group("engine settings (written to config.pbtxt; see docs/settings.md)")
    config.add_arguments(engine, EngineConfig)
    serving = p.add_argument_group("Triton model settings (written to config.pbtxt)")
    config.add_arguments(serving, ServingConfig)
    compress = p.add_argument_group("compression (recorded in engine.json)")
    config.add_arguments(compress, BuildConfig)


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
    argv = sys.argv[1:] if argv is None else argv
    if "--pool" in argv:  # a pool of built entries, not a model
        from builders.pool import main as build_pool

        return build_pool(argv)
    parser = argparse.ArgumentParser(prog="build.py", description=__doc__.split("\n\n")[0])
    add_build_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
