"""The engine in a process of its own, so the server's interpreter lock serves only requests and responses.

Inside Triton's Python stub, execute(), the response thread and the engine loop share one GIL. On an
H100 at 256 streams the loop makes about 28,000 tokens a second and is busy in Python most of each
step; the response thread, whose every send waits on the server and then on the GIL again, got
about 300 sends a second and the engine itself slowed to half its offline speed (README, issue 6).
vLLM runs its engine core in a separate process for the same
reason. Here the child runs the loop alone on its main thread: it reads commands between steps and
hands each step's outputs, while the GPU computes the next step, to a thread that sends them. The parent
tokenizes, checks requests (so a bad one is refused at once, with the same messages as the engine),
and hands outputs to each request's callback from a reader thread. Commands go out through a
sender thread, so no caller ever blocks on the pipe: a caller blocked there while holding the lock
the reader needs, with the child blocked sending to that reader, would stop both processes.

    engine = EngineProcess("model_repository/smollm2/1/engine", EngineConfig())
    engine.add_request("r1", "Hello", SamplingParams(max_tokens=8), on_output=print)
    engine.shutdown()
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path

from python_backend.engine.engine import Engine, EngineConfig, check_request
from python_backend.engine.engine_folder import open_engine_folder
from python_backend.engine.sequence import RequestOutput, SamplingError, SamplingParams

_STATE_INTERVAL_S = 0.05  # how often the child sends the scheduler's state for the metrics
_IDLE_WAIT_S = 0.05


class EngineProcessError(RuntimeError):
    """The engine process could not start, or has exited."""


def python_executable() -> str:
    """An interpreter for the child. In Triton's stub sys.executable is the stub binary, not Python;
    $FASTSERVE_PYTHON, then python3 on PATH (serve.py puts the project's interpreter first)."""
    chosen = os.environ.get("FASTSERVE_PYTHON")
    if chosen:
        return chosen
    if Path(sys.executable or "").name.startswith("python"):
        return sys.executable
    found = shutil.which("python3") or shutil.which("python")
    if not found:
        raise EngineProcessError("no Python interpreter for the engine process: set FASTSERVE_PYTHON")
    return found


class EngineProcess:
    """Engine's request interface (add_request, abort, snapshot, shutdown, tokenizer) over a child process."""

    def __init__(self, folder: str | Path, config: EngineConfig | None = None, start_timeout_s: float = 1800.0):
        from transformers import AutoTokenizer

        self.config = config or EngineConfig()
        self.folder = open_engine_folder(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder.path))
        if not hasattr(sys, "argv"):  # an embedded interpreter may have none; spawn reads it
            sys.argv = [""]
        ctx = mp.get_context("spawn")
        ctx.set_executable(python_executable())
        cmd_r, self._cmd = ctx.Pipe(duplex=False)
        self._out, out_w = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=_child_main,
            args=(str(self.folder.path), self.config, cmd_r, out_w),
            name="fastserve-engine",
            daemon=True,
        )
        self._proc.start()
        cmd_r.close()
        out_w.close()
        ready = self._wait_ready(start_timeout_s)
        self.max_model_len: int = ready["max_model_len"]
        self._state: dict = ready["state"]
        self._callbacks: dict[str, Callable[[RequestOutput], object] | None] = {}
        self._lock = threading.Lock()  # the callbacks and the command pipe
        self._dead: str | None = None
        self._stopping = False
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read_loop, name="fastserve-engine-reader", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name="fastserve-engine-sender", daemon=True)
        self._reader.start()
        self._sender.start()

    def _wait_ready(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._out.poll(0.5):
                try:
                    kind, payload = self._out.recv()
                except EOFError:
                    break
                if kind == "ready":
                    return payload
                self._proc.join(timeout=10)
                raise EngineProcessError(payload)
            if not self._proc.is_alive():
                break
        self._proc.join(timeout=1)
        if self._proc.is_alive():
            self._proc.kill()
            raise EngineProcessError(f"the engine process was not ready after {timeout_s:.0f} s")
        raise EngineProcessError(f"the engine process exited (code {self._proc.exitcode}) before it was ready")

    # ---- requests -------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        on_output: Callable[[RequestOutput], object] | None = None,
        priority: int = 0,
    ) -> None:
        """Check and queue a request; returns at once. Raises like Engine.add_request, and
        EngineProcessError once the engine process has exited."""
        error = self.add_requests([(request_id, prompt, params, on_output, priority)])[0]
        if error is not None:
            raise error

    def add_requests(
        self, items: list[tuple[str, str | list[int], SamplingParams, Callable | None, int]]
    ) -> list[Exception | None]:
        """Many requests at once: one tokenizer call and one message. Per item, None or the error
        that refused it (the others still run)."""
        texts = [p for _, p, _, _, _ in items if isinstance(p, str)]
        encoded = iter(self.tokenizer(texts, add_special_tokens=False).input_ids if texts else [])
        errors: list[Exception | None] = []
        batch = []
        with self._lock:
            for rid, prompt, params, on_output, priority in items:
                ids = next(encoded) if isinstance(prompt, str) else list(prompt)
                try:
                    if self._dead is not None:
                        raise EngineProcessError(self._dead)
                    check_request(ids, params, self.max_model_len, len(self._callbacks), self.config.max_queue_size)
                    if rid in self._callbacks:
                        raise SamplingError(f"request id {rid!r} is already running")
                except Exception as e:
                    errors.append(e)
                    continue
                self._callbacks[rid] = on_output
                batch.append((rid, ids, params, priority))
                errors.append(None)
            if batch:
                self._commands.put(("add_many", batch))
        return errors

    def abort(self, request_id: str) -> None:
        """Stop a request at the next iteration; its callback gets a final 'cancelled' output."""
        with self._lock:
            if self._dead is None and request_id in self._callbacks:
                self._commands.put(("abort", request_id))

    def snapshot(self) -> dict:
        """The newest scheduler and KV-cache state the child sent (at most ~50 ms old)."""
        return self._state

    @property
    def in_flight(self) -> int:
        return len(self._callbacks)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def _send_loop(self) -> None:
        while True:
            command = self._commands.get()
            if command is None:
                return
            try:
                self._cmd.send(command)
            except OSError:  # the child is gone; the reader fails what is in flight
                return

    # ---- outputs --------------------------------------------------------------------------------
    def _read_loop(self) -> None:
        while True:
            try:
                kind, payload = self._out.recv()
            except (EOFError, OSError):
                break
            if kind == "out":
                outputs, state = payload
                if state is not None:
                    self._state = state
                for fields in outputs:
                    self._deliver(RequestOutput(*fields))
            elif kind == "stopped":
                break
        self._proc.join(timeout=5)
        with self._lock:
            if not self._stopping:
                self._dead = f"the engine process exited (code {self._proc.exitcode}); reload the model"
            orphans, self._callbacks = list(self._callbacks.items()), {}
        reason = "cancelled" if self._stopping else "error"
        for rid, callback in orphans:
            if callback is not None:
                try:
                    callback(RequestOutput(rid, "", [], True, reason, 0, 0, error=self._dead))
                except Exception:
                    pass

    def _deliver(self, out: RequestOutput) -> None:
        with self._lock:
            callback = (
                self._callbacks.pop(out.request_id, None) if out.finished else self._callbacks.get(out.request_id)
            )
        if callback is None:
            return
        try:
            callback(out)
        except Exception:  # a broken callback must not stop the others
            if not out.finished:
                self.abort(out.request_id)

    # ---- stopping -------------------------------------------------------------------------------
    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Stop the child; requests still in flight end as 'cancelled'."""
        with self._lock:
            self._stopping = True
            if self._dead is None:
                self._commands.put(("stop", None))
            self._commands.put(None)
        self._sender.join(timeout=timeout_s)
        self._reader.join(timeout=timeout_s)
        self._proc.join(timeout=timeout_s)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)
        self._cmd.close()
        self._out.close()


def _encode(out: RequestOutput) -> tuple:
    """A plain tuple pickles about four times faster than the dataclass (256 outputs: ~45 us, not ~200)."""
    return (
        out.request_id,
        out.text,
        out.token_ids,
        out.finished,
        out.finish_reason,
        out.num_input_tokens,
        out.num_output_tokens,
        out.num_cached_tokens,
        out.logprobs,
        out.error,
    )


class _Outbox:
    """The child's side of the output pipe. The engine hands each step's outputs over and goes on; a
    thread of its own sends them, everything waiting as one message. So a parent slow to read (its
    GIL busy with responses) delays delivery but never the engine: with the engine writing the pipe
    itself, a full pipe stopped the decode loop."""

    def __init__(self, conn: Connection, engine: Engine):
        self.conn = conn
        self.engine = engine
        self.outputs: list[tuple] = []  # the engine thread's, since its last hand-over
        self.next_state = 0.0
        self._cond = threading.Condition()
        self._queue: list[list] = []  # messages in order; outputs handed over while one waits join it
        self._closing = False
        self.broken = False  # the parent is gone
        self._thread = threading.Thread(target=self._send_loop, name="fastserve-outbox", daemon=True)
        self._thread.start()

    def put(self, out: RequestOutput) -> None:
        self.outputs.append(_encode(out))

    def send(self) -> None:
        """Hand over this step's outputs (and, every _STATE_INTERVAL_S, the scheduler's state)."""
        now = time.monotonic()
        state = None
        if now >= self.next_state:
            self.next_state = now + _STATE_INTERVAL_S
            state = self.engine.snapshot()
        if self.outputs or state is not None:
            outputs, self.outputs = self.outputs, []
            with self._cond:
                last = self._queue[-1] if self._queue else None
                if last is not None and last[0] == "out":
                    last[1] += outputs
                    last[2] = state if state is not None else last[2]
                else:
                    self._queue.append(["out", outputs, state])
                self._cond.notify()

    def post(self, kind: str, payload) -> None:
        """A message of its own, sent after every output handed over before it."""
        with self._cond:
            self._queue.append([kind, payload])
            self._cond.notify()

    def close(self, timeout_s: float = 30.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=timeout_s)

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                while not (self._queue or self._closing):
                    self._cond.wait()
                queue_, self._queue = self._queue, []
                closing = self._closing
            try:
                for item in queue_:
                    self.conn.send(("out", (item[1], item[2])) if item[0] == "out" else tuple(item))
            except (OSError, BrokenPipeError, EOFError):
                self.broken = True
                return
            if closing and not queue_:
                return


def _child_main(folder: str, config: EngineConfig, cmd: Connection, out: Connection) -> None:
    """The engine loop on the main thread: commands in between steps, outputs handed to the outbox
    once per step."""
    try:
        engine = Engine(folder, config)
    except BaseException as e:
        out.send(("failed", f"the engine did not start: {type(e).__name__}: {e}\n{traceback.format_exc()}"))
        return
    box = _Outbox(out, engine)
    engine.on_flush = box.send  # inside step(), while the GPU runs the step just launched
    box.post("ready", {"max_model_len": engine.max_model_len, "state": engine.snapshot()})
    try:
        while not box.broken:
            while cmd.poll():
                kind, *args = cmd.recv()
                if kind == "stop":
                    engine.shutdown()
                    box.send()
                    box.post("stopped", None)
                    box.close()
                    return
                if kind == "add_many":
                    for item in args[0]:
                        _add(engine, box, *item)
                elif kind == "abort":
                    engine.abort(args[0])
            busy = engine.step_or_fail()
            box.send()
            if not busy and not engine.has_work():
                wait([cmd], timeout=_IDLE_WAIT_S)
    except (EOFError, OSError, BrokenPipeError):
        return  # the server went away


def _add(engine: Engine, box: _Outbox, request_id: str, ids: list[int], params: SamplingParams, priority: int) -> None:
    try:
        engine.add_request(request_id, ids, params, box.put, priority)
    except Exception as e:  # checked in the parent already; this is a race (a full queue) or a bug
        box.put(RequestOutput(request_id, "", [], True, "error", len(ids), 0, error=str(e)))
