"""The build's graphs: the ONNX export checked by polygraphy, and a TensorRT engine built from it.

    python builders/build.py --model smollm2 --name smollm2_onnx --backend onnx
    python builders/build.py --model smollm2 --name smollm2_onnx_int4 --backend onnx --quantize int4 --group-size 32
    python builders/build.py --model smollm2 --name smollm2_trt --backend tensorrt --device gpu

Both are written into the engine folder beside the safetensors weights and named in engine.json
under "graph", with the check's record; the engine's runner setting picks which one serves. An int8
or int4 build exports its codes as MatMulNBits (builders/onnx_nbits.py): the check then runs on a
copy whose products are float32, which must match the reference as closely as a dense graph, and
the served graph (int8 activations) is compared too, for the record.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from builders.onnx_export import ONNX_FILE, OPSET, Decoder, OnnxExportError, export, with_accuracy_level
from builders.onnx_nbits import EXACT_ACCURACY_LEVEL, SERVED_ACCURACY_LEVEL
from python_backend.engine.graph_runner import GraphNames, tensorrt_missing

TENSORRT_FILE = "model.plan"
EXACT_FILE = "model.exact.onnx"  # a quantized graph with float32 products, for the check only
CHECK_LENGTHS = (5, 24, 64)  # prompt lengths the polygraphy check feeds


class GraphBuildError(RuntimeError):
    pass


ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime", "polygraphy")
BACKEND_OF_RUNNER = {"onnxruntime": "onnx", "tensorrt": "tensorrt"}  # the build a graph runner needs
SERVES = {"pytorch": (), "onnx": ("onnxruntime",), "tensorrt": ("onnxruntime", "tensorrt")}  # graph runners


def check_backend(
    backend: str, on_gpu: bool, quantize: str, runner: str, dtype: str, int8_activations: bool = True
) -> None:
    """Refuse, before any work, a graph build that cannot succeed here, an entry whose runner
    setting could not load it, or a graph setting that would change nothing."""
    import importlib.util

    if runner in BACKEND_OF_RUNNER and runner not in SERVES[backend]:
        raise GraphBuildError(f"--runner {runner} needs an entry built with --backend {BACKEND_OF_RUNNER[runner]}")
    if not int8_activations and (backend != "onnx" or quantize == "none"):
        raise GraphBuildError(
            "--no-int8-activations sets how the ONNX graph multiplies quantized weights: it needs --backend onnx "
            "and --quantize int8, int4 or gguf"
        )
    if backend == "pytorch":
        return
    missing = [m for m in ONNX_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise GraphBuildError(
            f"--backend {backend} needs {', '.join(missing)}: install FastServe's onnx extra (pip install -e .[onnx])"
        )
    if backend == "onnx" and on_gpu:
        raise GraphBuildError("--backend onnx serves with ONNX Runtime on the CPU; build it with --device cpu")
    if backend == "tensorrt" and quantize != "none":
        raise GraphBuildError(f"--backend tensorrt builds from dense weights; drop --quantize {quantize}")
    if backend == "tensorrt":
        if not on_gpu:
            raise GraphBuildError("--backend tensorrt builds an engine for the GPU; give --device gpu")
        why = tensorrt_missing(builder=True)
        if why:
            raise GraphBuildError(f"--backend tensorrt: {why}")
    if quantize == "fp8":
        raise GraphBuildError("--backend onnx takes dense, int8 and int4 weights; fp8 runs on GPUs (--backend pytorch)")
    if dtype != "float32":
        raise GraphBuildError(f"--backend {backend} exports a float32 graph; give --dtype float32 (not {dtype})")


def check_prompts(tokenizer) -> list[list[int]]:
    """Token ids of evaluation text at a few lengths: what the polygraphy check feeds."""
    from builders.text import token_ids

    ids, _ = token_ids(tokenizer, "evaluation", sum(CHECK_LENGTHS))
    out, at = [], 0
    for n in CHECK_LENGTHS:
        out.append(ids[at : at + n])
        at += n
    return out


def build_graphs(
    engine_dir: Path,
    backend: str,
    tokenizer,
    log: Callable[[str], None],
    max_seqs: int,
    max_step_tokens: int,
    int8_activations: bool = True,
) -> dict:
    """Export (and for tensorrt, compile) the engine folder's model; returns engine.json's "graph"."""
    level = SERVED_ACCURACY_LEVEL if int8_activations else EXACT_ACCURACY_LEVEL
    try:
        decoder = Decoder.from_engine_folder(engine_dir, accuracy_level=level, contrib_rotary=backend == "onnx")
    except OnnxExportError as e:
        raise GraphBuildError(str(e)) from e
    decoder.eval()
    weights = "int8/int4 codes as MatMulNBits" if decoder.quantized else "float32"
    log(f"exporting the decoder to ONNX (opset {OPSET}, {weights}, KV cache as inputs and outputs)")
    export(decoder, engine_dir / ONNX_FILE)
    from builders.onnx_check import check_graph

    prompts = check_prompts(tokenizer)
    exact_path = engine_dir / ONNX_FILE
    if decoder.quantized and level != EXACT_ACCURACY_LEVEL:  # float32 products first: the export must be exact
        exact_path = with_accuracy_level(engine_dir / ONNX_FILE, engine_dir / EXACT_FILE, EXACT_ACCURACY_LEVEL)
    log("comparing ONNX Runtime with PyTorch (polygraphy)")
    try:
        check = check_graph(exact_path, decoder, prompts)
    finally:
        if exact_path != engine_dir / ONNX_FILE:
            exact_path.unlink(missing_ok=True)
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
    served = None
    if exact_path != engine_dir / ONNX_FILE:
        served = check_graph(engine_dir / ONNX_FILE, decoder, prompts, tolerances=False)
        log(
            f"with int8 activations (accuracy level {level}): max |diff| logits "
            f"{served.max_abs_diff['logits']:.2e}, greedy agreement {served.greedy_agreement:.1%}"
        )
    max_len = int(decoder.cos.shape[0])  # the graph's rotary table: positions beyond it do not exist
    graph = {
        "backend": backend,
        "onnx": ONNX_FILE,
        "opset": OPSET,
        "dtype": "float32",
        "max_model_len": max_len,
        "check": check.to_dict(),
    }
    if decoder.quantized:
        graph["weights"] = {"operator": "MatMulNBits", "accuracy_level": level}
    if served is not None:
        graph["check_served"] = served.to_dict()
    if backend == "tensorrt":
        log("building the TensorRT engine from the ONNX graph (polygraphy)")
        profiles = tensorrt_profiles(decoder, max_seqs, min(max_step_tokens, max_len), max_len)
        build_tensorrt(engine_dir / ONNX_FILE, engine_dir / TENSORRT_FILE, profiles)
        graph["tensorrt"] = TENSORRT_FILE
    return graph


Shapes = dict[str, tuple[tuple, tuple, tuple]]  # input name -> min, opt and max shape


def tensorrt_profiles(decoder: Decoder, max_seqs: int, max_step: int, max_len: int) -> list[Shapes]:
    """Two optimization profiles, in graph_runner's order: prefill (one sequence, up to a step's
    tokens after up to a context of cache) and decode (up to max_seqs sequences, one token each)."""
    cfg = decoder.cfg
    heads, hd = cfg.num_kv_heads, cfg.head_dim

    def profile(batch: int, seq: int, opt_batch: int, opt_seq: int) -> Shapes:
        opt_past = min(512, max_len - seq)
        shapes = {
            "input_ids": ((1, 1), (opt_batch, opt_seq), (batch, seq)),
            "position_ids": ((1, 1), (opt_batch, opt_seq), (batch, seq)),
            "attention_mask": ((1, 1), (opt_batch, opt_past + opt_seq), (batch, max_len)),
            "logit_positions": ((1, 1), (opt_batch, 1 if seq == 1 else opt_seq), (batch, seq)),
        }
        for name in GraphNames(cfg.num_layers).past:
            shapes[name] = ((1, heads, 0, hd), (opt_batch, heads, opt_past, hd), (batch, heads, max_len - 1, hd))
        return shapes

    prefill = profile(1, max_step, 1, min(256, max_step))
    decode = profile(max_seqs, 1, min(8, max_seqs), 1)
    return [prefill, decode]


def build_tensorrt(onnx_path: Path, out: Path, profiles: list[Shapes]) -> None:
    """A TensorRT engine from the ONNX graph with the optimization profiles given."""
    why = tensorrt_missing(builder=True)
    if why:
        raise GraphBuildError(why)
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    trt_profiles = []
    for shapes in profiles:
        profile = Profile()
        for name, (low, opt, high) in shapes.items():
            profile.add(name, min=low, opt=opt, max=high)
        trt_profiles.append(profile)
    engine = EngineFromNetwork(NetworkFromOnnxPath(str(onnx_path)), config=CreateConfig(profiles=trt_profiles))
    SaveEngine(engine, path=str(out))()
