"""The engine in this process: the public offline and streaming API.

    engine = Engine.from_folder("model_repository/smollm2/1/engine")
    results = engine.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))

    engine.start()                                   # the loop on a background thread
    engine.add_request("r1", "Hello", SamplingParams(max_tokens=32), on_output=print)

Without start(), the caller drives the loop: generate() and run_until_done() step it in the calling
thread, as do tests through step().
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

import torch

from python_backend.engine.client import (
    EngineClient,
    Overloaded,
    Result,
    Submission,
    check_request,
)
from python_backend.engine.config import EngineConfig
from python_backend.engine.core import EngineCore
from python_backend.engine.engine_folder import open_engine_folder
from python_backend.engine.loader import load
from python_backend.engine.sequence import SamplingParams, Sequence

__all__ = ["Engine", "EngineConfig", "Overloaded", "Result", "SamplingParams", "check_request"]

log = logging.getLogger("fastserve.engine")


def default_device(folder: str | Path) -> str:
    """Where an engine folder runs by default: CUDA when it was built for the GPU and one is here."""
    built_for = open_engine_folder(folder).meta.get("device")
    if built_for == "gpu" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


class Engine(EngineClient):
    def __init__(self, folder: str | Path, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        parts = load(folder, self.config)
        self.folder = parts.folder
        self.tokenizer = parts.tokenizer
        self.model = parts.model
        self.device = parts.device
        self.dtype = parts.dtype
        self.pool = parts.pool
        self.gemv_timings = parts.gemv_timings
        self.graphs_captured = parts.graphs_captured
        self.graph_capture_s = parts.graph_capture_s
        self.core = EngineCore(parts)
        self.max_model_len = self.core.max_model_len
        self._drive_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @classmethod
    def from_folder(cls, folder: str | Path, **overrides) -> Engine:
        """An engine for a built folder, on the device it was built for unless `device=` says otherwise;
        other keyword arguments are EngineConfig settings."""
        overrides.setdefault("device", default_device(folder))
        return cls(folder, EngineConfig(**overrides))

    # ---- the parts tests and benchmarks look at ---------------------------------------------------
    @property
    def blocks(self):
        return self.core.blocks

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def runner(self):
        return self.core.runner

    @property
    def stats(self):
        return self.core.stats

    @property
    def last_error(self) -> BaseException | None:
        """The newest error of a step or of an output callback; each is logged too."""
        return self.core.last_error

    @property
    def run_ahead(self) -> bool:
        return self.core.run_ahead

    @property
    def eos_ids(self) -> list[int]:
        return self.core.eos_ids

    @property
    def on_flush(self):
        return self.core.on_flush

    @on_flush.setter
    def on_flush(self, callback) -> None:
        self.core.on_flush = callback

    # ---- requests -------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt, add_special_tokens=False).input_ids
        return list(prompt)

    def submit(self, item: Submission) -> Sequence:
        """Check and queue one request; returns its Sequence (progress, timing) at once."""
        ids = self.encode(item.prompt)
        check_request(ids, item.params, self.max_model_len, self.core.num_in_flight, self.config.max_queue_size)
        seq = Sequence(
            request_id=item.request_id,
            prompt_ids=ids,
            params=item.params,
            on_output=item.on_output,
            priority=item.priority,
        )
        self.core.add(seq)
        return seq

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, on_output=None, priority: int = 0
    ) -> Sequence:
        return self.submit(Submission(request_id, prompt, params, on_output, priority))

    def add_requests(self, items: list[Submission]) -> list[Exception | None]:
        errors: list[Exception | None] = []
        for item in items:
            try:
                self.submit(item)
                errors.append(None)
            except Exception as e:
                errors.append(e)
        return errors

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)

    def snapshot(self) -> dict:
        return self.core.snapshot()

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams]) -> list[Result]:
        """Offline: run these prompts to completion; results in order. Without a loop thread the
        caller drives the loop, and no per-token callback runs: each result is read off its finished
        sequence, which costs nothing per step."""
        if self._thread is not None:
            return super().generate(prompts, params)
        plist = params if isinstance(params, list) else [params] * len(prompts)
        base = f"gen-{next(self._request_ids)}-"
        seqs: list[Sequence] = []
        try:
            for i, (p, sp) in enumerate(zip(prompts, plist)):
                seqs.append(self.submit(Submission(base + str(i), p, sp)))
        except Exception:
            for seq in seqs:
                self.abort(seq.request_id)
            raise
        with self._drive_lock:  # callers without a loop thread take turns driving it
            while not all(s.done for s in seqs):
                self.core.step()
        return [Result.of(s) for s in seqs]

    # ---- the loop -------------------------------------------------------------------------------
    def prompt_logits(self, ids: list[int]) -> torch.Tensor:
        """float32 logits [len(ids), vocab] at every position of `ids` (teacher-forced), for evaluation.
        Borrows KV blocks for the one prefill and gives them back; not while the loop thread runs."""
        if self._thread is not None:
            raise RuntimeError("prompt_logits drives the model directly; call it on an engine that is not started")
        if not 0 < len(ids) <= self.max_model_len:
            raise ValueError(f"prompt_logits takes 1 to {self.max_model_len} tokens, got {len(ids)}")
        blocks = self.core.blocks
        seq = Sequence(request_id="score", prompt_ids=list(ids), params=SamplingParams(max_tokens=1))
        with self._drive_lock:
            seq.block_table = blocks.allocate(blocks.blocks_for(len(ids)))
            try:
                return self.runner.prompt_logits(seq)
            finally:
                blocks.free(seq.block_table)

    def has_work(self) -> bool:
        return self.core.has_work()

    def step(self) -> bool:
        """One iteration; False when there was nothing to do."""
        return self.core.step()

    @property
    def down(self) -> str | None:
        """Why the engine cannot run any step (a tensor-parallel rank is gone), or None."""
        return getattr(self.model, "down", None)

    def step_or_fail(self) -> bool:
        """step(), except that an error ends the requests in flight, logged and with an error naming
        the cause, instead of the loop: a server keeps serving new requests after one bad iteration."""
        try:
            return self.core.step()
        except Exception as e:
            self.core.fail_all(e)
            return False

    def run_until_done(self) -> None:
        """Drive the loop in this thread until every request has finished (engine not started)."""
        while self.core.has_work():
            self.core.step()

    @classmethod
    def launch(cls, folder: str | Path, config: EngineConfig | None = None) -> Engine:
        """Build the engine on a new thread and run its loop there; returns once it is built.

        Servers should use this rather than Engine(...).start(): with PyTorch's OpenMP, once one
        thread has run parallel work (loading and packing weights does), another thread's parallel
        regions get little of it. Doing everything on the loop's own thread avoids that."""
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

    def _loop(self) -> None:
        wake = self.core.wake
        while not self._stop.is_set():
            if not self.step_or_fail():
                wake.wait(timeout=0.05)
                wake.clear()

    def shutdown(self) -> None:
        self._stop.set()
        self.core.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.core.cancel_all()
        self.core.close()
        close_model = getattr(self.model, "close", None)  # a tensor-parallel model's worker ranks
        if close_model is not None:
            close_model()
