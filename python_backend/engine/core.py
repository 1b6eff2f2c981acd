"""The engine's core: one step is schedule → run → process outputs.

Other threads only put work in the inbox (add, abort); the thread that calls step() alone touches
sequences, blocks and the model, so there are no locks on the hot path.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time

import torch

from python_backend.engine.cpu_turns import turns_for
from python_backend.engine.loader import LoadedEngine, make_scheduler
from python_backend.engine.outputs import EngineStats, OutputProcessor
from python_backend.engine.sampler import greedy, sample
from python_backend.engine.scheduler import ScheduledBatch
from python_backend.engine.sequence import Sequence

log = logging.getLogger("fastserve.engine")


class _Ahead:
    """A decode step launched before the previous step's tokens were read (run ahead)."""

    __slots__ = ("batch", "logits", "start")

    def __init__(self, batch: ScheduledBatch, logits: torch.Tensor, start: float):
        self.batch, self.logits, self.start = batch, logits, start


class EngineCore:
    def __init__(self, parts: LoadedEngine):
        cfg = parts.config
        self.parts = parts
        self.config = cfg
        self.device = parts.device
        self.blocks = parts.blocks
        self.runner = parts.runner
        self.max_model_len = parts.max_model_len
        self.eos_ids = parts.eos_ids
        self.scheduler = make_scheduler(parts)
        self.run_ahead = cfg.run_ahead == "on" or (cfg.run_ahead == "auto" and self.device.type == "cuda")
        self._turn = turns_for(self.device.type, cfg.cpu_take_turns)
        self.stats = EngineStats()
        self.outputs = OutputProcessor(parts.tokenizer, self.eos_ids, self.max_model_len, self.stats, self._end)
        self.outputs.on_callback_error = self._callback_failed
        self._generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self._ahead: _Ahead | None = None
        self._ids_host: torch.Tensor | None = None  # pinned; a step's tokens on their way back (run ahead)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0  # requests added but not yet taken from the inbox
        self._pending_lock = threading.Lock()
        self._arrivals = itertools.count()
        self.seqs: dict[str, Sequence] = {}
        self.wake = threading.Event()  # set when work arrives
        self.on_flush = None  # called after each step's outputs are handed out
        self.last_error: BaseException | None = None

    # ---- the inbox: any thread --------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.params.seed is not None and not seq.params.greedy:
            seq.generator = torch.Generator(device=self.device).manual_seed(seq.params.seed)
        self.outputs.start(seq)
        with self._pending_lock:
            self._pending += 1
        self._inbox.put(("add", seq))
        self.wake.set()

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self.wake.set()

    @property
    def num_in_flight(self) -> int:
        return len(self.seqs) + self._pending

    def has_work(self) -> bool:
        return bool(self.seqs) or self._pending > 0 or self.outputs.pending or self._ahead is not None

    # ---- the step: the engine thread only ---------------------------------------------------------
    def step(self) -> bool:
        """One iteration; False when there was nothing to do."""
        self._drain_inbox()
        if self._ahead is not None:
            return self._finish_ahead()
        batch = self.scheduler.schedule()
        if batch.empty:
            return self._flush()
        start = time.perf_counter()
        for seq, _ in batch.prefills:
            if seq.timing.first_scheduled is None:
                seq.timing.first_scheduled = start
        self.scheduler.fence()
        with self._turn:
            logits, sampled = self.runner.run(batch)
        self.scheduler.after_step(batch)
        self.scheduler.proactive()
        self.stats.steps += 1
        self.stats.prompt_tokens += sum(n for _, n in batch.prefills)
        return self._process(batch, logits, sampled, start)

    def _process(
        self, batch: ScheduledBatch, logits: torch.Tensor | None, sampled: list[Sequence], start: float
    ) -> bool:
        """Send the previous step's tokens while this one computes, then take this step's tokens."""
        self._flush()
        if sampled:
            with self._turn:  # a step launched ahead computes here
                ids = self._launch_ahead(batch, logits, sampled)
                logprobs = None
                if ids is None:
                    ids, logprobs = sample(logits, sampled, self.eos_ids, self._generator)
            now = time.perf_counter()
            for i, (seq, token) in enumerate(zip(sampled, ids)):
                if not seq.finished:
                    self.outputs.append(seq, token, None if logprobs is None else logprobs[i], now)
        self.scheduler.charge(batch, time.perf_counter() - start)
        return True

    def _finish_ahead(self) -> bool:
        """The step launched ahead: its sequences are counted one token further; those that ended
        meanwhile (EOS, a stop string, cancelled) drop their token."""
        ahead, self._ahead = self._ahead, None
        live = ScheduledBatch(decodes=[s for s in ahead.batch.decodes if not s.finished])
        self.scheduler.after_step(live)
        self.stats.steps += 1
        return self._process(live, ahead.logits, ahead.batch.decodes, ahead.start)

    def _launch_ahead(self, batch: ScheduledBatch, logits: torch.Tensor, sampled: list[Sequence]) -> list[int] | None:
        """When the next step is sure to be this batch again, launch it before this step's tokens reach
        the host, its input tokens this step's greedy choices still on the device; then return those
        choices (None, and nothing launched, where the next step is not sure). The GPU then does not
        wait for the host between steps.

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
        self._ahead = _Ahead(launched, next_logits, start)
        self.stats.steps_ahead += 1
        if ready is not None:
            ready.synchronize()
        return host.tolist()

    def _flush(self) -> bool:
        sent = self.outputs.flush()
        if sent and self.on_flush is not None:
            self.on_flush()
        return sent

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                with self._pending_lock:
                    self._pending -= 1
                if item.request_id in self.seqs:
                    item.error = f"request id {item.request_id!r} is already running"
                    item.finish_reason = "error"
                    self.outputs.send_final(item)
                    continue
                item.arrival_index = next(self._arrivals)
                self.seqs[item.request_id] = item
                self.scheduler.add(item)
            elif kind == "abort":
                seq = self.seqs.get(item)
                if seq is not None:
                    self.finish(seq, "cancelled")

    # ---- ending sequences -------------------------------------------------------------------------
    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence and send its final output now (cancellation, errors)."""
        self._end(seq, reason)
        self.outputs.send_final(seq)

    def _end(self, seq: Sequence, reason: str) -> None:
        """Free the sequence's place and blocks. Safe while a forward pass that includes it is still
        running on the GPU: no block is handed out again before that pass's results are read."""
        self.scheduler.finish(seq)
        self.seqs.pop(seq.request_id, None)
        seq.finish_reason = reason
        seq.timing.finished = time.perf_counter()
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1

    def _callback_failed(self, seq: Sequence, error: BaseException) -> None:
        self.last_error = error
        log.error("output callback of request %s failed", seq.request_id, exc_info=error)

    def fail_all(self, error: BaseException) -> None:
        """After a step raised: end every request in flight with an error naming the cause, so the
        engine can go on serving new ones."""
        self.last_error = error
        log.error("engine step failed; ending %d requests in flight", len(self.seqs), exc_info=error)
        self._ahead = None
        message = f"the engine failed: {type(error).__name__}: {error}"
        for seq in list(self.seqs.values()):
            seq.error = message
            self.finish(seq, "error")

    def cancel_all(self) -> None:
        """At shutdown: requests in flight end as 'cancelled'."""
        self._drain_inbox()
        self._ahead = None  # its tokens are not sent: its sequences end here as cancelled
        self._flush()
        for seq in list(self.seqs.values()):
            self.finish(seq, "cancelled")

    def close(self) -> None:
        """Let go of the host lock CPU steps take turns on."""
        close = getattr(self._turn, "close", None)
        if close is not None:
            close()

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
