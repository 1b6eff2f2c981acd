"""Everything the engine needs before its first step: the model and tokenizer, the KV cache sized to
memory, the GPU's tuned kernels and captured CUDA graphs, and the scheduler the config asks for."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from python_backend.engine import config as settings
from python_backend.engine.config import EngineConfig
from python_backend.engine.engine_folder import EngineFolder, open_engine_folder
from python_backend.engine.graph_runner import GraphRunner, GraphShape, OnnxRuntimeSession, TensorRTSession
from python_backend.engine.kv_cache import BlockManager, KVPool
from python_backend.engine.kv_swap import KVSwapper
from python_backend.engine.mlfq import MLFQConfig, MLFQScheduler, PrefillProfile
from python_backend.engine.runner import DecodeGraphs, Runner
from python_backend.engine.scheduler import Policy, ScheduledBatch, Scheduler
from python_backend.engine.sequence import SamplingParams, Sequence
from python_backend.models import sparse
from python_backend.models.llama import LlamaModel, ModelConfig

_DEFAULT_MAX_LEN = 4096  # for a model that declares no context length
log = logging.getLogger(__name__)


@dataclass
class LoadedEngine:
    """The parts of a ready engine."""

    folder: EngineFolder
    config: EngineConfig
    device: torch.device
    dtype: torch.dtype
    tokenizer: object
    model: LlamaModel | None  # None where an exported graph runs instead
    pool: KVPool | None  # None where the runner keeps each sequence's cache itself
    blocks: BlockManager
    runner: Runner | GraphRunner
    max_model_len: int
    eos_ids: list[int]
    bytes_per_block: int
    gemv_timings: dict[str, dict[str, float]] = field(default_factory=dict)
    graphs_captured: int = 0
    graph_capture_s: float = 0.0


def resolve_device(cfg: EngineConfig) -> torch.device:
    if cfg.device == "gpu":
        return torch.device("cuda")
    return torch.device(cfg.device)


def load(folder: str | Path | EngineFolder, cfg: EngineConfig) -> LoadedEngine:
    from transformers import AutoTokenizer

    settings.validate(cfg)
    folder = folder if isinstance(folder, EngineFolder) else open_engine_folder(folder)
    meta = folder.meta
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg)
    dtype = getattr(torch, meta.get("dtype", "float32") if cfg.dtype == "auto" else cfg.dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(folder.path))
    max_len = cfg.max_model_len or meta.get("max_model_len") or _DEFAULT_MAX_LEN
    runner_kind = folder.runner(cfg.runner)
    if runner_kind != "pytorch":
        return _load_graph(folder, cfg, runner_kind, device, tokenizer, max_len)
    kv = cfg.kv_cache_dtype
    if cfg.tensor_parallel > 1:
        return _load_tensor_parallel(folder, cfg, device, dtype, tokenizer, max_len)
    model = LlamaModel.load(
        folder.path,
        dtype,
        device,
        max_len,
        kernels=cfg.kernels,
        quantization=folder.quantization,
        sparse_min_rows=_sparse_min_rows(folder, cfg, device, dtype),
    )
    mcfg = model.cfg
    gemv_timings = {}
    if device.type == "cuda" and model.kernels and cfg.decode_gemv:
        gemv_timings = model.tune_decode_gemv()
    if mcfg.sliding_window and max_len > mcfg.sliding_window:
        max_len = mcfg.sliding_window  # beyond the window we would attend too far back
    per_block = KVPool.bytes_per_block(
        mcfg.num_layers, cfg.kv_block_size, mcfg.num_kv_heads, mcfg.head_dim, dtype, cfg.kv_cache_dtype
    )
    num_blocks = cfg.num_kv_blocks or _blocks_from_memory(cfg, device, per_block)
    if num_blocks < 2:
        raise RuntimeError(f"KV cache too small: {num_blocks} blocks of {per_block} bytes")
    max_model_len = min(max_len, num_blocks * cfg.kv_block_size)
    pool = KVPool.allocate(
        mcfg.num_layers, num_blocks, cfg.kv_block_size, mcfg.num_kv_heads, mcfg.head_dim, dtype, device, kv
    )
    graphs = None
    if device.type == "cuda" and cfg.cuda_graphs:
        num_blocks -= 1  # the last block is the graphs' scratch block, never handed out
        graphs = DecodeGraphs(model, pool, scratch_block=num_blocks, max_batch=cfg.max_graph_batch)
    blocks = BlockManager(num_blocks, cfg.kv_block_size, cfg.enable_prefix_caching)
    runner = Runner(model, pool, graphs)
    captured, capture_s = 0, 0.0
    if graphs is not None and cfg.capture_graphs_at_start:
        start = time.perf_counter()
        captured = graphs.capture_all(cfg.max_num_seqs, -(-max_model_len // cfg.kv_block_size))
        capture_s = time.perf_counter() - start
    eos_ids = folder.eos_token_ids or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    return LoadedEngine(
        folder,
        cfg,
        device,
        dtype,
        tokenizer,
        model,
        pool,
        blocks,
        runner,
        max_model_len,
        eos_ids,
        per_block,
        gemv_timings,
        captured,
        capture_s,
    )


def _load_tensor_parallel(
    folder: EngineFolder, cfg: EngineConfig, device: torch.device, dtype: torch.dtype, tokenizer, max_len: int
) -> LoadedEngine:
    """An engine whose model is split over cfg.tensor_parallel ranks (engine/tensor_parallel.py): rank 0
    here, the others worker processes. Each rank's KV cache holds its own heads in the same blocks."""
    from python_backend.engine import tensor_parallel

    if device.type != "cpu":
        raise ValueError(
            "tensor_parallel runs on CPUs (gloo) in this release; on GPUs serve one GPU per instance and "
            "scale with instance groups and replicas"
        )
    if folder.quantization or folder.two_four:
        raise ValueError("tensor_parallel takes a dense build (not quantized or 2:4-pruned weights)")
    kv = cfg.kv_cache_dtype
    sizes: dict[str, int] = {}

    def plan_blocks(local_cfg: ModelConfig) -> int:
        per_block = KVPool.bytes_per_block(
            local_cfg.num_layers, cfg.kv_block_size, local_cfg.num_kv_heads, local_cfg.head_dim, dtype, kv
        )
        blocks = cfg.num_kv_blocks or _blocks_from_memory(cfg, device, per_block)
        if blocks < 2:
            raise RuntimeError(f"KV cache too small: {blocks} blocks of {per_block} bytes")
        sizes["per_block"] = per_block
        return blocks

    model = tensor_parallel.start(
        folder.path, cfg.tensor_parallel, dtype, max_len, cfg.kv_block_size, kv, cfg.num_threads, plan_blocks
    )
    mcfg = model.cfg
    num_blocks = model.spec.num_blocks
    pool = KVPool.allocate(
        mcfg.num_layers, num_blocks, cfg.kv_block_size, mcfg.num_kv_heads, mcfg.head_dim, dtype, device, kv
    )
    blocks = BlockManager(num_blocks, cfg.kv_block_size, cfg.enable_prefix_caching)
    eos_ids = folder.eos_token_ids or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    max_model_len = min(max_len, num_blocks * cfg.kv_block_size)
    return LoadedEngine(
        folder, cfg, device, dtype, tokenizer, model, pool, blocks, Runner(model, pool, None), max_model_len, eos_ids,
        sizes["per_block"],
    )  # fmt: skip


def _load_graph(
    folder: EngineFolder, cfg: EngineConfig, kind: str, device: torch.device, tokenizer, max_len: int
) -> LoadedEngine:
    """An engine over the folder's exported graph: float32, its cache kept per sequence on the host, so
    the blocks only count memory (no prefix caching, no swapping). Logits and caches are host arrays
    whatever runs the graph, so the engine's own device (sampling) is the CPU."""
    if kind == "onnxruntime" and device.type != "cpu":
        raise ValueError(f"the onnxruntime runner runs on the CPU; device {cfg.device} asks for {device}")
    if cfg.kv_cache_dtype != "auto" or cfg.dtype not in ("auto", "float32"):
        raise ValueError(
            f"the {kind} runner serves the graph's float32 weights and cache; dtype {cfg.dtype} and "
            f"kv_cache_dtype {cfg.kv_cache_dtype} are for the pytorch runner"
        )
    device = torch.device("cpu")
    max_len = min(max_len, folder.graph.get("max_model_len") or max_len)  # the graph's rotary table
    mcfg = ModelConfig.from_hf(folder.hf_config)
    if mcfg.sliding_window and max_len > mcfg.sliding_window:
        max_len = mcfg.sliding_window
    dtype = torch.float32
    per_block = KVPool.bytes_per_block(
        mcfg.num_layers, cfg.kv_block_size, mcfg.num_kv_heads, mcfg.head_dim, dtype, "auto"
    )
    num_blocks = cfg.num_kv_blocks or _blocks_from_memory(cfg, torch.device("cpu"), per_block)
    if num_blocks < 2:
        raise RuntimeError(f"KV cache too small: {num_blocks} blocks of {per_block} bytes")
    if kind == "tensorrt":
        session = TensorRTSession(folder.path / folder.graph["tensorrt"], mcfg.num_layers)
    else:
        session = OnnxRuntimeSession(folder.path / folder.graph["onnx"], cfg.num_threads)
    shape = GraphShape(mcfg.num_layers, mcfg.num_kv_heads, mcfg.head_dim, mcfg.vocab_size)
    log.info("fastserve: %s runs %s", kind, folder.path)
    eos_ids = folder.eos_token_ids or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    return LoadedEngine(
        folder,
        cfg,
        device,
        dtype,
        tokenizer,
        None,
        None,
        BlockManager(num_blocks, cfg.kv_block_size, enable_prefix_caching=False),
        GraphRunner(session, shape),
        min(max_len, num_blocks * cfg.kv_block_size),
        eos_ids,
        per_block,
    )


def _sparse_min_rows(folder: EngineFolder, cfg: EngineConfig, device: torch.device, dtype: torch.dtype) -> int | None:
    """For a 2:4-pruned model, the row count from which steps run the sparse kernels; None: dense."""
    if not (folder.two_four and cfg.sparse_kernels):
        return None
    why = sparse.supported(device, dtype)
    if folder.quantization:
        why = f"the weights are quantized ({folder.quantization}) and keep their own kernels"
    if why:
        log.info("fastserve: the 2:4-pruned weights run as dense ones: %s", why)
        return None
    return cfg.sparse_min_rows


def _blocks_from_memory(cfg: EngineConfig, device: torch.device, per_block: int) -> int:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = cfg.kv_cache_memory_fraction * total - (total - free)
        return max(0, int(budget // per_block))
    return max(0, int(cfg.kv_cache_gb * (1 << 30) // per_block))


def make_scheduler(parts: LoadedEngine) -> Scheduler:
    cfg = parts.config
    if cfg.scheduler == "fcfs":
        return Scheduler(parts.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens, Policy())
    host_blocks = int(cfg.swap_space_gb * (1 << 30) // parts.bytes_per_block)
    if parts.pool is None:
        host_blocks = 0  # swapping moves blocks, and these hold nothing: a preempted job recomputes
    if parts.config.tensor_parallel > 1:
        host_blocks = 0  # a swap would have to move every rank's blocks: a preempted job recomputes
    swapper = KVSwapper(parts.pool, host_blocks, parts.device) if host_blocks > 0 else None
    mlfq = MLFQConfig(
        levels=cfg.mlfq_levels,
        base_quantum_s=cfg.mlfq_base_quantum_s,
        ratio=cfg.mlfq_ratio,
        starvation_s=cfg.mlfq_starvation_s,
        senior_s=cfg.mlfq_senior_s,
    )
    return MLFQScheduler(
        parts.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens, swapper, profile_prefill(parts), mlfq
    )


@torch.inference_mode()
def profile_prefill(parts: LoadedEngine) -> PrefillProfile:
    """Time prefills of a few lengths and a one-sequence decode step on this model and device, for
    the MLFQ's skip-join and default quanta. Uses free blocks and gives them back untouched."""
    cfg, blocks = parts.config, parts.blocks
    bs = cfg.kv_block_size
    top = min(1024, parts.max_model_len - 2, cfg.max_num_batched_tokens, (blocks.num_blocks - 1) * bs)
    lengths = sorted({n for n in (16, 64, 256, top) if 1 <= n <= top})

    def timed(batch: ScheduledBatch) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            logits, _ = parts.runner.run(batch)
            if logits is not None:
                logits.sum().item()
            best = min(best, time.perf_counter() - start)
        return best

    samples = []
    decode = 0.0
    for n in lengths:
        seq = Sequence(request_id="profile", prompt_ids=[1] * (n + 1), params=SamplingParams(max_tokens=1))
        seq.block_table = blocks.allocate(blocks.blocks_for(n + 1))
        samples.append((n, timed(ScheduledBatch(prefills=[(seq, n)]))))
        seq.num_computed = n
        decode = timed(ScheduledBatch(decodes=[seq]))
        blocks.free(seq.block_table)
    return PrefillProfile.fit(samples, decode)
