"""The build's graphs: the ONNX export checked by polygraphy, and a TensorRT engine built from it.

    python builders/build.py --model smollm2 --name smollm2_onnx --backend onnx
    python builders/build.py --model smollm2 --name smollm2_trt --backend tensorrt --device gpu

Both are written into the engine folder beside the safetensors weights and named in engine.json
under "graph", with the check's record; the engine's runner setting picks which one serves.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from builders.onnx_export import ONNX_FILE, OPSET, Decoder, OnnxExportError, export
from python_backend.engine.graph_runner import tensorrt_missing

TENSORRT_FILE = "model.plan"
CHECK_LENGTHS = (5, 24, 64)  # prompt lengths the polygraphy check feeds


class GraphBuildError(RuntimeError):
    pass


def check_backend(backend: str, on_gpu: bool, quantize: str) -> None:
    """Refuse, before any work, a graph build that cannot succeed here."""
    if backend == "pytorch":
        return
    if quantize != "none":
        raise GraphBuildError(f"--backend {backend} exports dense weights; drop --quantize {quantize}")
    if backend == "onnx" and on_gpu:
        raise GraphBuildError("--backend onnx serves with ONNX Runtime on the CPU; build it with --device cpu")
    if backend == "tensorrt":
        if not on_gpu:
            raise GraphBuildError("--backend tensorrt builds an engine for the GPU; give --device gpu")
        why = tensorrt_missing(builder=True)
        if why:
            raise GraphBuildError(f"--backend tensorrt: {why}")


def check_prompts(tokenizer) -> list[list[int]]:
    """Token ids of evaluation text at a few lengths: what the polygraphy check feeds."""
    from builders.text import token_ids

    ids, _ = token_ids(tokenizer, "evaluation", sum(CHECK_LENGTHS))
    out, at = [], 0
    for n in CHECK_LENGTHS:
        out.append(ids[at : at + n])
        at += n
    return out


def build_graphs(engine_dir: Path, backend: str, tokenizer, log: Callable[[str], None], max_batch: int) -> dict:
    """Export (and for tensorrt, compile) the engine folder's model; returns engine.json's "graph"."""
    try:
        decoder = Decoder.from_engine_folder(engine_dir)
    except OnnxExportError as e:
        raise GraphBuildError(str(e)) from e
    decoder.eval()
    log(f"exporting the decoder to ONNX (opset {OPSET}, float32, KV cache as inputs and outputs)")
    export(decoder, engine_dir / ONNX_FILE)
    from builders.onnx_check import check_graph

    log("comparing ONNX Runtime with PyTorch (polygraphy)")
    check = check_graph(engine_dir / ONNX_FILE, decoder, check_prompts(tokenizer))
    log(
        f"polygraphy: {'passed' if check.passed else 'FAILED'}, {check.feeds} feeds, max |diff| logits "
        f"{check.max_abs_diff['logits']:.2e}, KV {check.max_abs_diff['kv']:.2e}, greedy agreement "
        f"{check.greedy_agreement:.1%}"
    )
    if not check.passed:
        raise GraphBuildError(
            f"the ONNX graph disagrees with PyTorch beyond the tolerances {check.tolerances}: "
            f"max |diff| {check.max_abs_diff}"
        )
    graph = {"backend": backend, "onnx": ONNX_FILE, "opset": OPSET, "dtype": "float32", "check": check.to_dict()}
    if backend == "tensorrt":
        log("building the TensorRT engine from the ONNX graph (polygraphy)")
        build_tensorrt(engine_dir / ONNX_FILE, engine_dir / TENSORRT_FILE, decoder, max_batch)
        graph["tensorrt"] = TENSORRT_FILE
    return graph


def tensorrt_profile(decoder: Decoder, max_batch: int, max_len: int) -> dict[str, tuple[tuple, tuple, tuple]]:
    """min, opt and max shape of every input: decode batches up to max_batch, prefills up to max_len."""
    cfg = decoder.cfg
    kv = (cfg.num_kv_heads, cfg.head_dim)
    opt_batch = min(8, max_batch)
    shapes = {
        "input_ids": ((1, 1), (opt_batch, 1), (max_batch, max_len)),
        "position_ids": ((1, 1), (opt_batch, 1), (max_batch, max_len)),
        "attention_mask": ((1, 1), (opt_batch, 512), (max_batch, max_len)),
        "logit_positions": ((1, 1), (opt_batch, 1), (max_batch, max_len)),
    }
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            shapes[f"past_{kind}.{i}"] = (
                (1, kv[0], 0, kv[1]),
                (opt_batch, kv[0], 511, kv[1]),
                (max_batch, kv[0], max_len - 1, kv[1]),
            )
    return shapes


def build_tensorrt(onnx_path: Path, out: Path, decoder: Decoder, max_batch: int) -> None:
    """A TensorRT engine from the ONNX graph with one optimization profile over batch and length."""
    why = tensorrt_missing(builder=True)
    if why:
        raise GraphBuildError(why)
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    profile = Profile()
    max_len = int(decoder.cos.shape[0])
    for name, (low, opt, high) in tensorrt_profile(decoder, max_batch, max_len).items():
        profile.add(name, min=low, opt=opt, max=high)
    engine = EngineFromNetwork(NetworkFromOnnxPath(str(onnx_path)), config=CreateConfig(profiles=[profile]))
    SaveEngine(engine, path=str(out))()
