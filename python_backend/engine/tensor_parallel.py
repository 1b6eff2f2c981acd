"""Tensor parallelism: the model split over ranks (models/sharding.py), one process per rank.

Rank 0 is the engine itself: its scheduler, block manager, sampler and streaming are unchanged and see
one model. Its model is a `TensorParallelModel`, whose forward first sends the step (token ids,
positions, attention metadata, the rows that want logits) to the other ranks with one broadcast,
then runs its own shard. Every rank runs the same forward on its shard and its own KV pool (the
same block count, its own heads), meeting at two all-reduces per block and one gather of the
logits; block ids mean the same on every rank because only rank 0 hands them out.

The other ranks are worker processes started by rank 0, each loading its shard from the engine
folder. A worker leaves when rank 0 says stop, and by itself when its parent process is gone.

Collectives run through torch.distributed: gloo on CPUs. The CPU threads are shared among the
ranks. KV swapping to host memory is off under tensor parallelism (it would have to move every
rank's blocks), so a preempted job recomputes.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from python_backend.engine.kv_cache import KVPool
from python_backend.models.llama import LlamaModel, ModelConfig
from python_backend.models.sharding import Shard, shard_weights
from python_backend.ops.attention import AttentionMetadata

log = logging.getLogger("fastserve.engine")


class TensorParallelError(RuntimeError):
    pass


@dataclass
class RankSpec:
    """What every rank needs to build its part: the same for all but the rank number."""

    folder: str
    world: int
    dtype: str
    max_len: int
    num_blocks: int
    block_size: int
    kv_cache_dtype: str
    threads: int
    init_file: str


@dataclass
class Step:
    """One forward, as rank 0 sends it to the others."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logit_rows: torch.Tensor | None


def load_shard(folder: Path, shard: Shard, dtype: torch.dtype, max_len: int) -> LlamaModel:
    """The rank's model: its weight slices, and the collectives that join it to the other ranks."""
    import json

    from safetensors.torch import load_file

    cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    weights: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    local = shard.local_config(cfg)
    model = LlamaModel(local, shard_weights(weights, cfg, shard), dtype, torch.device("cpu"), max_len)
    if shard.world > 1:
        model.all_reduce = _all_reduce
        model.gather_vocab = _vocab_gatherer(cfg, shard)
    return model


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


def _vocab_gatherer(cfg: ModelConfig, shard: Shard):
    """Joins the ranks' slices of the logits along the vocabulary (padded to one size for the
    collective where the vocabulary does not split evenly)."""
    from python_backend.models.sharding import split

    sizes = [split(cfg.vocab_size, shard.world, r) for r in range(shard.world)]
    width = max(hi - lo for lo, hi in sizes)

    def gather(logits: torch.Tensor) -> torch.Tensor:
        pad = width - logits.shape[-1]
        part = torch.nn.functional.pad(logits, (0, pad)) if pad else logits.contiguous()
        parts = [torch.empty_like(part) for _ in range(shard.world)]
        dist.all_gather(parts, part)
        return torch.cat([p[..., : hi - lo] for p, (lo, hi) in zip(parts, sizes)], dim=-1)

    return gather


def _init_group(spec: RankSpec, rank: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{spec.init_file}", rank=rank, world_size=spec.world)


def _watch_parent(parent: int) -> None:
    """A worker outlives nothing: when the process that started it is gone, it exits."""
    while True:
        if os.getppid() != parent:
            os._exit(0)
        time.sleep(1.0)


def worker_main(spec: RankSpec, rank: int, parent: int) -> None:
    """A rank other than 0: load its shard and pool, then run each step rank 0 broadcasts."""
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    torch.set_num_threads(spec.threads)
    _init_group(spec, rank)
    dtype = getattr(torch, spec.dtype)
    model = load_shard(Path(spec.folder), Shard(rank, spec.world), dtype, spec.max_len)
    cfg = model.cfg
    pool = KVPool.allocate(
        cfg.num_layers,
        spec.num_blocks,
        spec.block_size,
        cfg.num_kv_heads,
        cfg.head_dim,
        dtype,
        torch.device("cpu"),
        spec.kv_cache_dtype,
    )
    dist.barrier()  # loaded: rank 0 may start sending steps
    with torch.inference_mode():
        while True:
            box: list = [None]
            dist.broadcast_object_list(box, src=0)
            step = box[0]
            if step is None:
                break
            model.forward(step.input_ids, step.positions, step.meta, pool.k, pool.v, step.logit_rows)
    dist.destroy_process_group()


class TensorParallelModel:
    """Rank 0's model: its own shard (attributes read through), whose forward first sends the step
    to the other ranks."""

    def __init__(self, local: LlamaModel, workers: list, spec: RankSpec):
        self.local = local
        self.workers = workers
        self.spec = spec
        self.world = spec.world
        self._closed = False
        atexit.register(self.close)

    def __getattr__(self, name: str):
        return getattr(self.local, name)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        k_cache: list[torch.Tensor],
        v_cache: list[torch.Tensor],
        logit_rows: torch.Tensor | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_workers()
        dist.broadcast_object_list([Step(input_ids, positions, meta, logit_rows)], src=0)
        return self.local.forward(input_ids, positions, meta, k_cache, v_cache, logit_rows, out)

    @property
    def down(self) -> str | None:
        """Why the model cannot run (a worker rank has exited), or None. The group cannot be mended
        in place, so an engine process exits on it and its parent starts everything again."""
        dead = [p.pid for p in self.workers if p.poll() is not None]
        if dead and not self._closed:
            return f"tensor-parallel worker processes {dead} have exited; the engine is down"
        return None

    def _check_workers(self) -> None:
        why = self.down
        if why:
            raise TensorParallelError(why)

    def close(self) -> None:
        """Stop the workers and leave the process group."""
        if self._closed:
            return
        self._closed = True
        try:
            if all(p.poll() is None for p in self.workers):
                dist.broadcast_object_list([None], src=0)
        finally:
            for p in self.workers:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            if dist.is_initialized():
                dist.destroy_process_group()
            Path(self.spec.init_file).unlink(missing_ok=True)


def _launch(spec: RankSpec, rank: int) -> subprocess.Popen:
    """A worker as a fresh interpreter (the engine may itself run in a daemonic process, which
    multiprocessing lets have no children), with the project importable."""
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    cmd = [
        sys.executable,
        "-m",
        "python_backend.engine.tensor_parallel",
        json.dumps(asdict(spec)),
        str(rank),
        str(os.getpid()),
    ]
    return subprocess.Popen(cmd, env=env, cwd=root)


def start(
    folder: Path,
    world: int,
    dtype: torch.dtype,
    max_len: int,
    block_size: int,
    kv_cache_dtype: str,
    threads: int,
    plan_blocks,
) -> TensorParallelModel:
    """Load rank 0's shard, size the KV cache with `plan_blocks(per-block bytes of rank 0)` (rank 0
    holds the most heads), start the other ranks and wait until every one has loaded."""

    if dist.is_initialized():
        raise TensorParallelError("one tensor-parallel engine per process: a process group is already running")
    cores = os.cpu_count() or 1
    threads = threads or max(1, cores // world)
    torch.set_num_threads(threads)
    local = load_shard(folder, Shard(0, world), dtype, max_len)
    num_blocks = plan_blocks(local.cfg)
    fd, init_file = tempfile.mkstemp(prefix="fastserve-tp-")
    os.close(fd)
    os.unlink(init_file)  # the store creates it; a stale file would hold an old group's state
    spec = RankSpec(str(folder), world, str(dtype).replace("torch.", ""), max_len, num_blocks, block_size,
                    kv_cache_dtype, threads, init_file)  # fmt: skip
    workers = [_launch(spec, r) for r in range(1, world)]
    try:
        _init_group(spec, 0)
    except Exception:
        for p in workers:
            p.kill()
        raise
    model = TensorParallelModel(local, workers, spec)
    dist.barrier()
    log.info("fastserve: tensor parallel over %d ranks (gloo), %d blocks each", world, num_blocks)
    return model


if __name__ == "__main__":
    worker_main(RankSpec(**json.loads(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3]))
