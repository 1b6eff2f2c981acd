"""The engine: one loop that schedules, runs the model, samples, detokenizes and reports.

    engine = Engine.from_folder("model_repository/smollm2/1/engine")
    engine.start()                                   # the loop in a background thread
    engine.add_request("r1", "Hello", SamplingParams(max_tokens=32), on_output=print)

Other threads only put work in an inbox (add, abort); the engine thread alone touches sequences,
blocks and the model, so there are no locks on the hot path. Without start(), a caller drives the
loop with step() (tests, the offline benchmark).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from python_backend.engine import detokenize
from python_backend.engine.engine_folder import open_engine_folder
from python_backend.engine.kv_cache import BlockManager, KVPool
from python_backend.engine.kv_swap import KVSwapper
from python_backend.engine.mlfq import MLFQConfig, MLFQScheduler, PrefillProfile
from python_backend.engine.runner import DecodeGraphs, Runner
from python_backend.engine.sampler import greedy, sample
from python_backend.engine.scheduler import Policy, ScheduledBatch, Scheduler
from python_backend.engine.sequence import RequestOutput, SamplingError, SamplingParams, Sequence
from python_backend.models.llama import LlamaModel


class Overloaded(RuntimeError):
    """Too many requests waiting; the client should retry later."""


def check_request(
    ids: list[int], params: SamplingParams, max_model_len: int, in_flight: int, max_queue_size: int
) -> None:
    """Raise SamplingError for a request that cannot be served (the message is for the client) and
    Overloaded when the queue is full. Shared by the engine and the process that fronts it."""
    params.validate()
    if not ids:
        raise SamplingError("the prompt is empty")
    if len(ids) >= max_model_len:
        raise SamplingError(
            f"the prompt has {len(ids)} tokens; this model's context is {max_model_len} "
            f"tokens, which must also hold at least one new token"
        )
    room = max_model_len - len(ids)
    if params.max_tokens > room:
        raise SamplingError(
            f"max_tokens={params.max_tokens} does not fit: the prompt has {len(ids)} tokens and "
            f"the context is {max_model_len}, leaving room for {room}"
        )
    if in_flight >= max_queue_size:
        raise Overloaded(f"{max_queue_size} requests are already queued; retry later")


@dataclass
class EngineConfig:
    device: str = "cpu"
    dtype: str | None = None  # default: the engine folder's
    num_kv_blocks: int = 0  # 0: from memory
    kv_cache_memory_fraction: float = 0.9  # GPU: share of total memory for weights + KV
    kv_cache_gb: float = 2.0  # CPU: memory for the KV pool
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 0  # 0: the engine folder's
    max_queue_size: int = 1024
    policy: str = "fcfs"  # or "mlfq": FastServe's skip-join MLFQ with KV swapping (mlfq.py)
    mlfq_levels: int = 0  # 0: from the start-up profile
    mlfq_base_quantum_s: float = 0.0  # 0: from the start-up profile
    mlfq_ratio: float = 2.0
    mlfq_starvation_s: float = 30.0
    mlfq_senior_s: float = 0.0  # 0: off; else seconds in the system after which a job runs ahead of the queues
    swap_space_gb: float = 4.0  # host memory for swapped-out KV blocks (MLFQ)
    enable_prefix_caching: bool = True
    kernels: bool = True  # the Triton attention and fused kernels (GPU only; the PyTorch reference otherwise)
    cuda_graphs: bool = True  # decode steps as CUDA graphs (GPU only)
    decode_gemv: bool = True  # GPU kernels: time the GEMV kernel against cuBLAS at start-up for 1-4 rows
    max_graph_batch: int = 256  # larger decode batches run eagerly
    capture_graphs_at_start: bool = True  # every decode graph before serving, not on first use
    run_ahead: str = "auto"  # launch the next decode step before reading this one's tokens: auto (GPU), on, off
    num_threads: int = 0  # CPU threads for torch; 0 leaves torch's default
    seed: int = 0

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> EngineConfig:
        """From config.pbtxt parameters (strings); unknown keys are ignored, bad values named."""
        cfg = cls()
        for name, _f in cls.__dataclass_fields__.items():
            key = {"block_size": "kv_block_size", "policy": "scheduler_policy"}.get(name, name)
            if key not in params or params[key] == "":
                continue
            raw = params[key]
            try:
                default = getattr(cfg, name)
                kind = str if default is None else type(default)
                value = raw.lower() in ("1", "true", "yes") if kind is bool else kind(raw)
            except (TypeError, ValueError) as e:
                raise ValueError(f"parameter {key}={raw!r}: {e}") from e
            setattr(cfg, name, value)
        return cfg


@dataclass
class EngineStats:
    steps: int = 0
    steps_ahead: int = 0  # decode steps launched before the previous step's tokens were read
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)


class Engine:
    def __init__(self, folder: str | Path, config: EngineConfig | None = None):
        from transformers import AutoTokenizer

        self.config = cfg = config or EngineConfig()
        self.folder = open_engine_folder(folder)
        meta = self.folder.meta
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = torch.device(cfg.device if cfg.device != "gpu" else "cuda")
        dtype_name = cfg.dtype or meta.get("dtype", "float32")
        self.dtype = getattr(torch, dtype_name)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder.path))
        max_len = cfg.max_model_len or meta.get("max_model_len") or 4096
        self.model = LlamaModel.load(self.folder.path, self.dtype, self.device, max_len, kernels=cfg.kernels)
        mcfg = self.model.cfg
        self.gemv_timings: dict[str, dict[str, float]] = {}
        if self.device.type == "cuda" and self.model.kernels and cfg.decode_gemv:
            self.gemv_timings = self.model.tune_decode_gemv()
        if mcfg.sliding_window and max_len > mcfg.sliding_window:
            max_len = mcfg.sliding_window  # beyond the window we would attend too far back
        per_block = KVPool.bytes_per_block(
            mcfg.num_layers, cfg.block_size, mcfg.num_kv_heads, mcfg.head_dim, self.dtype
        )
        num_blocks = cfg.num_kv_blocks or self._blocks_from_memory(per_block)
        if num_blocks < 2:
            raise RuntimeError(f"KV cache too small: {num_blocks} blocks of {per_block} bytes")
        self.max_model_len = min(max_len, num_blocks * cfg.block_size)
        self.pool = KVPool.allocate(
            mcfg.num_layers, num_blocks, cfg.block_size, mcfg.num_kv_heads, mcfg.head_dim, self.dtype, self.device
        )
        graphs = None
        if self.device.type == "cuda" and cfg.cuda_graphs:
            num_blocks -= 1  # the last block is the graphs' scratch block, never handed out
            graphs = DecodeGraphs(self.model, self.pool, scratch_block=num_blocks, max_batch=cfg.max_graph_batch)
        self.blocks = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.runner = Runner(self.model, self.pool, graphs)
        if graphs is not None and cfg.capture_graphs_at_start:
            start = time.perf_counter()
            self.graphs_captured = graphs.capture_all(cfg.max_num_seqs, -(-self.max_model_len // cfg.block_size))
            self.graph_capture_s = time.perf_counter() - start
        self.scheduler = self._scheduler(cfg, per_block)
        if cfg.run_ahead not in ("auto", "on", "off"):
            raise ValueError(f"parameter run_ahead={cfg.run_ahead!r}: auto, on or off")
        self.run_ahead = cfg.run_ahead == "on" or (cfg.run_ahead == "auto" and self.device.type == "cuda")
        self._ahead: tuple[ScheduledBatch, torch.Tensor, float] | None = None  # a step launched ahead
        self._ids_host: torch.Tensor | None = None  # pinned; a step's tokens on their way back (run ahead)
        self.eos_ids = self.folder.eos_token_ids or (
            [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        )
        self.stats = EngineStats()
        self._generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._seqs: dict[str, Sequence] = {}
        self._unsent: list[tuple[Sequence, int, float | None, str | None]] = []  # tokens not yet detokenized
        self._decode = detokenize.decoder(self.tokenizer)
        self._arrivals = itertools.count()
        self._pending = 0  # requests added but not yet taken from the inbox
        self._pending_lock = threading.Lock()
        self._drive_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.last_error: BaseException | None = None
        self.on_flush: Callable[[], object] | None = None  # after each step's outputs are handed out

    @classmethod
    def from_folder(cls, folder: str | Path, **overrides) -> Engine:
        return cls(folder, EngineConfig(**overrides))

    def _scheduler(self, cfg: EngineConfig, bytes_per_block: int) -> Scheduler:
        if cfg.policy == "fcfs":
            return Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens, Policy())
        if cfg.policy == "mlfq":
            host_blocks = int(cfg.swap_space_gb * (1 << 30) // bytes_per_block)
            swapper = KVSwapper(self.pool, host_blocks, self.device) if host_blocks > 0 else None
            mlfq = MLFQConfig(
                levels=cfg.mlfq_levels,
                base_quantum_s=cfg.mlfq_base_quantum_s,
                ratio=cfg.mlfq_ratio,
                starvation_s=cfg.mlfq_starvation_s,
                senior_s=cfg.mlfq_senior_s,
            )
            return MLFQScheduler(
                self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens, swapper, self._profile(), mlfq
            )
        raise ValueError(f"scheduler policy {cfg.policy!r} is not available (fcfs, mlfq)")

    @torch.inference_mode()
    def _profile(self) -> PrefillProfile:
        """Time prefills of a few lengths and a one-sequence decode step on this model and device, for
        the MLFQ's skip-join and default quanta. Uses free blocks and gives them back untouched."""
        bs = self.config.block_size
        top = min(1024, self.max_model_len - 2, self.config.max_num_batched_tokens, (self.blocks.num_blocks - 1) * bs)
        lengths = sorted({n for n in (16, 64, 256, top) if 1 <= n <= top})

        def timed(batch: ScheduledBatch) -> float:
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                logits, _ = self.runner.run(batch)
                if logits is not None:
                    logits.sum().item()
                best = min(best, time.perf_counter() - start)
            return best

        samples = []
        seq = None
        for n in lengths:
            seq = Sequence(request_id="profile", prompt_ids=[1] * (n + 1), params=SamplingParams(max_tokens=1))
            seq.block_table = self.blocks.allocate(self.blocks.blocks_for(n + 1))
            samples.append((n, timed(ScheduledBatch(prefills=[(seq, n)]))))
            seq.num_computed = n
            decode = timed(ScheduledBatch(decodes=[seq]))
            self.blocks.free(seq.block_table)
        return PrefillProfile.fit(samples, decode)

    def _blocks_from_memory(self, per_block: int) -> int:
        cfg = self.config
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = cfg.kv_cache_memory_fraction * total - (total - free)
            return max(0, int(budget // per_block))
        return max(0, int(cfg.kv_cache_gb * (1 << 30) // per_block))

    # ---- requests -------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt, add_special_tokens=False).input_ids
        return list(prompt)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        on_output: Callable[[RequestOutput], object] | None = None,
        priority: int = 0,
    ) -> Sequence:
        """Check and queue a request; returns at once. Raises SamplingError for a request that cannot
        be served (the message is for the client) and Overloaded when the queue is full."""
        ids = self.encode(prompt)
        check_request(ids, params, self.max_model_len, len(self._seqs) + self._pending, self.config.max_queue_size)
        seq = Sequence(request_id=request_id, prompt_ids=ids, params=params, on_output=on_output, priority=priority)
        if params.seed is not None and not params.greedy:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        seq.detok = detokenize.new_state(ids)
        with self._pending_lock:
            self._pending += 1
        self._inbox.put(("add", seq))
        self._wake.set()
        return seq

    def add_requests(
        self, items: list[tuple[str, str | list[int], SamplingParams, Callable | None, int]]
    ) -> list[Exception | None]:
        """add_request for each (id, prompt, params, on_output, priority); per item, None or the
        error that refused it."""
        errors: list[Exception | None] = []
        for rid, prompt, params, on_output, priority in items:
            try:
                self.add_request(rid, prompt, params, on_output, priority)
                errors.append(None)
            except Exception as e:
                errors.append(e)
        return errors

    def abort(self, request_id: str) -> None:
        """Stop a request at the next iteration; its callback gets a final 'cancelled' output."""
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                with self._pending_lock:
                    self._pending -= 1
                if item.request_id in self._seqs:
                    self._emit(
                        item,
                        RequestOutput(
                            item.request_id,
                            "",
                            [],
                            True,
                            "error",
                            len(item.prompt_ids),
                            0,
                            error=f"request id {item.request_id!r} is already running",
                        ),
                    )
                    continue
                item.arrival_index = next(self._arrivals)
                self._seqs[item.request_id] = item
                self.scheduler.add(item)
            elif kind == "abort":
                seq = self._seqs.get(item)
                if seq is not None:
                    self._finish(seq, "cancelled")

    def snapshot(self) -> dict:
        """The scheduler's and the KV cache's state as plain numbers, for metrics."""
        sched = self.scheduler
        return {
            **sched.state(),
            "waiting": len(sched.waiting),
            "running": len(sched.running),
            "kv_used": self.blocks.num_used,
            "kv_total": self.blocks.num_blocks,
            "prefix_hit_tokens": sched.prefix_hit_tokens,
        }

    # ---- the loop -------------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self._seqs) or self._pending > 0 or bool(self._unsent) or self._ahead is not None

    def step(self) -> bool:
        """One iteration; False when there was nothing to do.

        The CPU works while the GPU computes: once this step's forward pass is queued, the previous
        step's tokens are detokenized, checked for stop strings and sent (`_flush`); only then does
        sampling wait for the GPU. A stop string is therefore found one step late; the token made
        meanwhile for that sequence is dropped. Length and EOS ends are found at once, so a finished
        sequence never takes a place in the next batch.

        A step launched ahead (_launch_ahead) is finished here first: its sequences are counted one
        token further, those that ended meanwhile (EOS, a stop string, cancelled) drop their token."""
        self._drain_inbox()
        if self._ahead is not None:
            launched, logits, start = self._ahead
            self._ahead = None
            live = ScheduledBatch(decodes=[s for s in launched.decodes if not s.finished])
            self.scheduler.after_step(live)
            self.stats.steps += 1
            return self._complete(live, logits, launched.decodes, start)
        batch = self.scheduler.schedule()
        if batch.empty:
            return self._flush()
        start = time.perf_counter()
        for seq, _ in batch.prefills:
            if seq.timing.first_scheduled is None:
                seq.timing.first_scheduled = start
        self.scheduler.fence()
        logits, sampled = self.runner.run(batch)
        self.scheduler.after_step(batch)
        self.scheduler.proactive()
        self.stats.steps += 1
        self.stats.prompt_tokens += sum(n for _, n in batch.prefills)
        return self._complete(batch, logits, sampled, start)

    def _complete(
        self, batch: ScheduledBatch, logits: torch.Tensor | None, sampled: list[Sequence], start: float
    ) -> bool:
        """Send the previous step's tokens while this one computes, then take this step's tokens."""
        self._flush()
        if sampled:
            ahead = self._launch_ahead(batch, logits, sampled)
            if ahead is not None:
                ids, logprobs = ahead, None
            else:
                ids, logprobs = sample(logits, sampled, self.eos_ids, self._generator)
            now = time.perf_counter()
            for i, (seq, token) in enumerate(zip(sampled, ids)):
                if not seq.finished:
                    self._append(seq, token, None if logprobs is None else logprobs[i], now)
        self.scheduler.charge(batch, time.perf_counter() - start)
        return True

    def _launch_ahead(self, batch: ScheduledBatch, logits: torch.Tensor, sampled: list[Sequence]) -> list[int] | None:
        """When the next step is sure to be this batch again, launch it before this step's tokens reach
        the host, its input tokens this step's greedy choices still on the device; then return those
        choices (None, and nothing launched, where the next step is not sure). The GPU then does not
        wait for the host between steps: on the H100 a one-sequence step spent ~0.13 ms of 1.41 ms
        idle while the host read the token, scheduled and copied the next inputs (1.30 ms with this).

        Sure means: only decodes, all greedy with nothing the sampler adjusts per step (penalties,
        logprobs, min_tokens), none can end by length at this token, no request waiting or arriving,
        and a block free for each sequence's next token."""
        if not self.run_ahead or batch.prefills or self._pending or not self._inbox.empty():
            return None
        seqs = batch.decodes
        if len(seqs) != len(sampled) or self.scheduler.num_unfinished != len(seqs):
            return None
        for seq in seqs:
            p = seq.params
            if (
                seq.finished
                or not p.greedy
                or p.logprobs
                or p.uses_penalties
                or p.min_tokens > len(seq.output_ids)
                or len(seq.output_ids) + 2 > p.max_tokens
                or seq.num_tokens + 2 > self.max_model_len
            ):
                return None
        if not self.scheduler.reserve_next(seqs):
            return None
        ids = greedy(logits)
        host, ready = ids, None
        if ids.is_cuda:  # the copy back is queued before the next step: reading it must not wait for that step
            n = ids.shape[0]
            if self._ids_host is None or self._ids_host.shape[0] < n:  # read below, before any reuse
                self._ids_host = torch.empty(max(n, self.config.max_num_seqs), dtype=ids.dtype, pin_memory=True)
            host = self._ids_host[:n]
            host.copy_(ids, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        start = time.perf_counter()
        launched = ScheduledBatch(decodes=list(seqs))
        next_logits, _ = self.runner.run(launched, decode_ids=ids)
        self._ahead = (launched, next_logits, start)
        self.stats.steps_ahead += 1
        if ready is not None:
            ready.synchronize()
        return host.tolist()

    def _append(self, seq: Sequence, token: int, logprob: float | None, now: float) -> None:
        """Record a new token; end the sequence now if it made EOS or reached its length. Text and
        stop strings wait for _flush."""
        params = seq.params
        seq.output_ids.append(token)
        self.stats.generation_tokens += 1
        if logprob is not None and params.logprobs:
            seq.logprobs.append(logprob)
        if seq.timing.first_token is None:
            seq.timing.first_token = now
        seq.timing.token_times.append(now)
        n_out = len(seq.output_ids)
        reason = None
        if token in self.eos_ids and not params.ignore_eos and n_out > params.min_tokens - 1:
            reason = "stop"
        elif n_out >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self._end(seq, reason)
        self._unsent.append((seq, token, logprob, reason))

    def _flush(self) -> bool:
        """Detokenize and send the tokens recorded since the last flush; True if there were any."""
        unsent, self._unsent = self._unsent, []
        for seq, token, logprob, reason in unsent:
            if seq.finished and reason is None:
                continue  # ended since (cancelled, or a stop string in an earlier token)
            params = seq.params
            n_out = len(seq.output_ids)
            if reason != "stop" or token not in self.eos_ids:
                detokenize.add_token(self._decode, seq.detok, token)
            if reason != "stop":
                stop_at = detokenize.find_stop(seq.detok, params.stop) if n_out >= params.min_tokens else None
                if stop_at is not None:
                    seq.detok.text = seq.detok.text[:stop_at]
                    if reason is None:
                        self._end(seq, "stop")
                    else:  # the stop string came with the last allowed token: it is a stop
                        self.stats.finished[reason] -= 1
                        self.stats.finished["stop"] = self.stats.finished.get("stop", 0) + 1
                        seq.finish_reason = "stop"
                    reason = "stop"
            if reason is not None:
                self._send_final(seq)
                continue
            delta = detokenize.take_delta(seq.detok, params.stop, final=False)
            self._emit(
                seq,
                RequestOutput(
                    seq.request_id,
                    delta,
                    [token],
                    False,
                    None,
                    len(seq.prompt_ids),
                    n_out,
                    seq.num_cached_tokens,
                    [logprob] if params.logprobs and logprob is not None else None,
                ),
            )
        if unsent and self.on_flush is not None:
            self.on_flush()
        return bool(unsent)

    def _finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence and send its final output now (cancellation, errors)."""
        self._end(seq, reason)
        self._send_final(seq)

    def _end(self, seq: Sequence, reason: str) -> None:
        """Free the sequence's place and blocks. Safe while a forward pass that includes it is still
        running on the GPU: no block is handed out again before that pass's results are read."""
        self.scheduler.finish(seq)
        self._seqs.pop(seq.request_id, None)
        seq.finish_reason = reason
        seq.timing.finished = time.perf_counter()
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1

    def _send_final(self, seq: Sequence) -> None:
        reason = seq.finish_reason
        delta = detokenize.take_delta(seq.detok, seq.params.stop, final=True)
        last = [seq.output_ids[-1]] if seq.output_ids and reason != "cancelled" else []
        self._emit(
            seq,
            RequestOutput(
                seq.request_id,
                delta,
                last,
                True,
                reason,
                len(seq.prompt_ids),
                len(seq.output_ids),
                seq.num_cached_tokens,
                seq.logprobs[-1:] if seq.params.logprobs else None,
            ),
        )

    def _emit(self, seq: Sequence, out: RequestOutput) -> None:
        if seq.on_output is not None:
            try:
                seq.on_output(out)
            except Exception as e:  # a broken callback must not take the engine down
                self.last_error = e
                if not out.finished:
                    self._finish(seq, "error")

    # ---- running it -----------------------------------------------------------------------------
    @classmethod
    def launch(cls, folder: str | Path, config: EngineConfig | None = None) -> Engine:
        """Build the engine on a new thread and run its loop there; returns once it is built.

        Servers should use this rather than Engine(...).start(): with PyTorch's OpenMP, once the main
        thread has run parallel work (loading and packing weights does), another thread's parallel
        regions get little of it: bf16 matrix products ran about 2x slower on this 2-core machine.
        Doing everything on the loop's own thread avoids that."""
        ready: queue.SimpleQueue = queue.SimpleQueue()

        def main() -> None:
            try:
                engine = cls(folder, config)
            except BaseException as e:  # handed to the caller
                ready.put(e)
                return
            engine._thread = threading.current_thread()
            ready.put(engine)
            engine._loop()

        threading.Thread(target=main, name="fastserve-engine", daemon=True).start()
        result = ready.get()
        if isinstance(result, BaseException):
            raise result
        return result

    def start(self) -> Engine:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="fastserve-engine", daemon=True)
            self._thread.start()
        return self

    def step_or_fail(self) -> bool:
        """step(), except that an error ends the requests in flight instead of the loop: a server
        keeps serving new requests after one bad iteration."""
        try:
            return self.step()
        except Exception as e:
            self.last_error = e
            self._ahead = None
            for seq in list(self._seqs.values()):
                self._finish(seq, "error")
            return False

    def _loop(self) -> None:
        while not self._stop.is_set():
            busy = self.step_or_fail()
            if not busy:
                self._wake.wait(timeout=0.05)
                self._wake.clear()

    def shutdown(self) -> None:
        """Stop the loop; requests still in flight end as 'cancelled'."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._drain_inbox()
        self._ahead = None  # its tokens are not sent: its sequences end here as cancelled
        self._flush()
        for seq in list(self._seqs.values()):
            self._finish(seq, "cancelled")

    def run_until_done(self) -> None:
        """Drive the loop in this thread until every request has finished (engine not started)."""
        while self.has_work():
            self.step()

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams]) -> list[Result]:
        """Offline: run these prompts to completion; results in order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        results = [Result() for _ in prompts]
        base = f"gen-{next(self._arrivals)}-"
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            self.add_request(base + str(i), p, sp, results[i].collect)
        if self._thread is None:
            with self._drive_lock:  # callers without a loop thread take turns driving it
                while not all(r.done.is_set() for r in results):
                    self.step()
        else:
            for r in results:
                r.done.wait()
        return results

    async def stream(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Outputs as they are made, for asyncio callers; needs start(). Cancelling the iteration
        aborts the request."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.add_request(request_id, prompt, params, lambda o: loop.call_soon_threadsafe(q.put_nowait, o), priority)
        try:
            while True:
                out = await q.get()
                yield out
                if out.finished:
                    return
        finally:
            if request_id in self._seqs:
                self.abort(request_id)


@dataclass
class Result:
    """A whole request's output, gathered from its stream of RequestOutputs."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_input_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def collect(self, out: RequestOutput) -> None:
        self.text += out.text
        if out.finish_reason != "cancelled":
            self.token_ids += out.token_ids
        self.num_input_tokens = out.num_input_tokens
        self.num_cached_tokens = out.num_cached_tokens
        if out.finished:
            self.finish_reason = out.finish_reason
            self.error = out.error
            self.done.set()
