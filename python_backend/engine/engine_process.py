"""The engine in a process of its own, so the server's interpreter lock serves only requests and responses,
and a new one when it dies.

Inside Triton's Python stub, execute(), the response thread and an engine loop would share one GIL;
at hundreds of streams the loop is busy in Python most of each step, and sends and the engine slow
each other down. Here the child runs the loop alone on its main thread: it reads commands between
steps and hands each step's outputs, while the GPU computes the next step, to a thread that sends
them. The parent tokenizes, checks requests (so a bad one is refused at once, with the same
messages as the engine), and hands outputs to each request's callback from a reader thread.
Commands go out through a sender thread, so no caller ever blocks on the pipe.

When the child dies (killed, out of memory, a CUDA error), every request in flight ends at once with
an 'unavailable' error, and the parent starts a new child, retrying with backoff up to `restarts`
times. Meanwhile new requests are refused with EngineUnavailable, which a client can retry.

    engine = EngineProcess("model_repository/smollm2/1/engine", EngineConfig())
    engine.add_request("r1", "Hello", SamplingParams(max_tokens=8), on_output=print)
    engine.shutdown()
"""

from __future__ import annotations

import logging
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

from python_backend.engine.client import EngineClient, EngineUnavailable, OutputCallback, Submission, check_request
from python_backend.engine.config import EngineConfig
from python_backend.engine.engine import Engine
from python_backend.engine.engine_folder import open_engine_folder
from python_backend.engine.messages import (
    Abort,
    AddRequests,
    NewRequest,
    Outputs,
    Ready,
    StartFailed,
    Stop,
    Stopped,
)
from python_backend.engine.sequence import RequestOutput, SamplingError

log = logging.getLogger("fastserve.engine")

_STATE_INTERVAL_S = 0.05  # how often the child sends the scheduler's state for the metrics
_IDLE_WAIT_S = 0.05
_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # between restart attempts; the last repeats


class EngineProcessError(EngineUnavailable):
    """The engine process could not start, or has exited for good."""


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


class _Child:
    """One engine process and the two threads that talk to it."""

    def __init__(self, folder: Path, config: EngineConfig, timeout_s: float, cancelled=lambda: False):
        if not hasattr(sys, "argv"):  # an embedded interpreter may have none; spawn reads it
            sys.argv = [""]
        ctx = mp.get_context("spawn")
        ctx.set_executable(python_executable())
        cmd_r, self.cmd = ctx.Pipe(duplex=False)
        self.out, out_w = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(
            target=_child_main, args=(str(folder), config, cmd_r, out_w), name="fastserve-engine", daemon=True
        )
        self.proc.start()
        cmd_r.close()
        out_w.close()
        self.ready = self._wait_ready(timeout_s, cancelled)
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.sender = threading.Thread(target=self._send_loop, name="fastserve-engine-sender", daemon=True)
        self.sender.start()

    def _wait_ready(self, timeout_s: float, cancelled) -> Ready:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if cancelled():
                self.proc.kill()
                self.proc.join(timeout=5)
                self.close()
                raise EngineProcessError("the engine process was stopped while it started")
            if self.out.poll(0.5):
                try:
                    message = self.out.recv()
                except EOFError:
                    break
                if isinstance(message, Ready):
                    return message
                self.proc.join(timeout=10)
                self.close()
                raise EngineProcessError(message.message)
            if not self.proc.is_alive():
                break
        self.proc.join(timeout=1)
        if self.proc.is_alive():
            self.proc.kill()
            self.close()
            raise EngineProcessError(f"the engine process was not ready after {timeout_s:.0f} s")
        self.close()
        raise EngineProcessError(f"the engine process exited (code {self.proc.exitcode}) before it was ready")

    def _send_loop(self) -> None:
        while True:
            command = self.commands.get()
            if command is None:
                return
            try:
                self.cmd.send(command)
            except OSError:  # the child is gone; its reader fails what is in flight
                return

    def close(self) -> None:
        for conn in (self.cmd, self.out):
            try:
                conn.close()
            except OSError:
                pass


class EngineProcess(EngineClient):
    """The engine's request interface over a child process, restarted when it dies."""

    def __init__(
        self,
        folder: str | Path,
        config: EngineConfig | None = None,
        start_timeout_s: float = 1800.0,
        restarts: int = 5,
        on_restart: Callable[[], object] | None = None,
    ):
        from transformers import AutoTokenizer

        self.config = config or EngineConfig()
        self.folder = open_engine_folder(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder.path))
        self.start_timeout_s = start_timeout_s
        self.max_restarts = restarts
        self.on_restart = on_restart
        self.restarts = 0  # new engine processes started after one died
        self._lock = threading.Lock()  # the callbacks, the current child and its command queue
        self._callbacks: dict[str, OutputCallback | None] = {}
        self._stopping = False
        self._stopped = threading.Event()  # wakes a restart waiting out its backoff
        self._down: str | None = None  # why no engine takes requests now
        self._child = _Child(self.folder.path, self.config, start_timeout_s)
        self._proc = self._child.proc  # the newest engine process, alive or not
        self.max_model_len: int = self._child.ready.max_model_len
        self._state: dict = self._child.ready.state
        self._reader = self._start_reader(self._child)

    # ---- requests -------------------------------------------------------------------------------
    def add_requests(self, items: list[Submission]) -> list[Exception | None]:
        """Many requests at once: one tokenizer call and one message."""
        texts = [it.prompt for it in items if isinstance(it.prompt, str)]
        encoded = iter(self.tokenizer(texts, add_special_tokens=False).input_ids if texts else [])
        errors: list[Exception | None] = []
        batch = []
        with self._lock:
            for it in items:
                ids = next(encoded) if isinstance(it.prompt, str) else list(it.prompt)
                try:
                    if self._child is None:
                        raise EngineUnavailable(self._down or "the engine is not running")
                    check_request(ids, it.params, self.max_model_len, len(self._callbacks), self.config.max_queue_size)
                    if it.request_id in self._callbacks:
                        raise SamplingError(f"request id {it.request_id!r} is already running")
                except Exception as e:
                    errors.append(e)
                    continue
                self._callbacks[it.request_id] = it.on_output
                batch.append(NewRequest(it.request_id, ids, it.params, it.priority))
                errors.append(None)
            if batch:
                self._child.commands.put(AddRequests(batch))
        return errors

    def abort(self, request_id: str) -> None:
        with self._lock:
            if self._child is not None and request_id in self._callbacks:
                self._child.commands.put(Abort(request_id))

    def snapshot(self) -> dict:
        """The newest scheduler and KV-cache state the child sent (at most ~50 ms old)."""
        return self._state

    @property
    def up(self) -> bool:
        """Whether an engine process is taking requests now."""
        return self._child is not None

    @property
    def in_flight(self) -> int:
        return len(self._callbacks)

    @property
    def pid(self) -> int | None:
        child = self._child
        return None if child is None else child.proc.pid

    # ---- outputs --------------------------------------------------------------------------------
    def _start_reader(self, child: _Child) -> threading.Thread:
        reader = threading.Thread(target=self._read_loop, args=(child,), name="fastserve-engine-reader", daemon=True)
        reader.start()
        return reader

    def _read_loop(self, child: _Child) -> None:
        while True:
            try:
                message = child.out.recv()
            except (EOFError, OSError):
                break
            if isinstance(message, Outputs):
                if message.state is not None:
                    self._state = message.state
                for out in message.unpack():
                    self._deliver(out)
            elif isinstance(message, Stopped):
                break
        child.proc.join(timeout=5)
        if child.proc.is_alive():  # it closed its pipe but lingers: it must not hold memory a new one needs
            child.proc.kill()
            child.proc.join(timeout=5)
        with self._lock:
            stopping = self._stopping
            if not stopping:
                self._down = (
                    f"the engine process exited (code {child.proc.exitcode}); a new one is starting, retry shortly"
                )
            self._child = None
            orphans, self._callbacks = list(self._callbacks.items()), {}
        child.commands.put(None)
        child.close()
        if stopping:
            self._end_all(orphans, RequestOutput("", "", [], True, "cancelled", 0, 0))
            return
        log.error("fastserve: %s; ending %d requests in flight", self._down, len(orphans))
        self._end_all(orphans, RequestOutput("", "", [], True, "error", 0, 0, error=self._down, unavailable=True))
        self._restart(child.proc.exitcode)

    @staticmethod
    def _end_all(orphans: list, final: RequestOutput) -> None:
        for rid, callback in orphans:
            if callback is None:
                continue
            try:
                callback(
                    RequestOutput(
                        rid,
                        final.text,
                        [],
                        True,
                        final.finish_reason,
                        0,
                        0,
                        error=final.error,
                        unavailable=final.unavailable,
                    )
                )
            except Exception:
                log.exception("fastserve: ending request %s failed", rid)

    def _restart(self, exitcode: int | None) -> None:
        """Start a new child, with backoff, up to max_restarts attempts."""
        last = ""
        for attempt in range(self.max_restarts):
            if self._stopped.wait(_BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)]):
                return
            log.warning("fastserve: starting a new engine process (attempt %d of %d)", attempt + 1, self.max_restarts)
            try:
                child = _Child(self.folder.path, self.config, self.start_timeout_s, cancelled=self._stopped.is_set)
            except Exception as e:
                last = str(e)
                log.error("fastserve: the new engine process did not start: %s", e)
                continue
            with self._lock:
                if self._stopping:
                    child.proc.kill()
                    child.proc.join(timeout=5)
                    child.commands.put(None)
                    child.close()
                    return
                self._child, self._down, self._proc = child, None, child.proc
                self._state = child.ready.state
                self.restarts += 1
            self._reader = self._start_reader(child)
            log.warning("fastserve: the engine process is back (pid %s, restart %d)", child.proc.pid, self.restarts)
            if self.on_restart is not None:
                try:
                    self.on_restart()
                except Exception:
                    log.exception("fastserve: the restart callback failed")
            return
        with self._lock:
            self._down = (
                f"the engine process exited (code {exitcode}) and {self.max_restarts} attempts to "
                f"start a new one failed ({last}); reload the model"
            )
        log.error("fastserve: %s", self._down)

    def _deliver(self, out: RequestOutput) -> None:
        with self._lock:
            if out.finished:
                callback = self._callbacks.pop(out.request_id, None)
            else:
                callback = self._callbacks.get(out.request_id)
        if callback is None:
            return
        try:
            callback(out)
        except Exception:  # a broken callback must not stop the others
            log.exception("fastserve: output callback of request %s failed", out.request_id)
            if not out.finished:
                self.abort(out.request_id)

    # ---- stopping -------------------------------------------------------------------------------
    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Stop the child; requests still in flight end as 'cancelled'."""
        with self._lock:
            self._stopping = True
            self._stopped.set()
            child = self._child
            if child is not None:
                child.commands.put(Stop())
        if child is None:  # down, or a new one starting: that start stops within a second
            self._reader.join(timeout=timeout_s)
            return
        self._reader.join(timeout=timeout_s)
        child.proc.join(timeout=timeout_s)
        if child.proc.is_alive():
            child.proc.kill()
            child.proc.join(timeout=5)
        child.commands.put(None)
        child.sender.join(timeout=5)
        child.close()


class _Outbox:
    """The child's side of the output pipe. The engine hands each step's outputs over and goes on; a
    thread of its own sends them, everything waiting as one message. So a parent slow to read (its
    GIL busy with responses) delays delivery but never the engine."""

    def __init__(self, conn: Connection, engine: Engine):
        self.conn = conn
        self.engine = engine
        self.rows: list[tuple] = []  # the engine thread's, since its last hand-over
        self.next_state = 0.0
        self._cond = threading.Condition()
        self._queue: list = []  # messages in order; outputs handed over while one waits join it
        self._closing = False
        self.broken = False  # the parent is gone
        self._thread = threading.Thread(target=self._send_loop, name="fastserve-outbox", daemon=True)
        self._thread.start()

    def put(self, out: RequestOutput) -> None:
        self.rows.append(Outputs.pack(out))

    def send(self) -> None:
        """Hand over this step's outputs (and, every _STATE_INTERVAL_S, the scheduler's state)."""
        now = time.monotonic()
        state = None
        if now >= self.next_state:
            self.next_state = now + _STATE_INTERVAL_S
            state = self.engine.snapshot()
        if self.rows or state is not None:
            rows, self.rows = self.rows, []
            with self._cond:
                last = self._queue[-1] if self._queue else None
                if isinstance(last, Outputs):
                    last.rows += rows
                    last.state = state if state is not None else last.state
                else:
                    self._queue.append(Outputs(rows, state))
                self._cond.notify()

    def post(self, message) -> None:
        """A message of its own, sent after every output handed over before it."""
        with self._cond:
            self._queue.append(message)
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
                pending, self._queue = self._queue, []
                closing = self._closing
            try:
                for message in pending:
                    self.conn.send(message)
            except (OSError, BrokenPipeError, EOFError):
                self.broken = True
                return
            if closing and not pending:
                return


def _child_main(folder: str, config: EngineConfig, cmd: Connection, out: Connection) -> None:
    """The engine loop on the main thread: commands in between steps, outputs handed to the outbox
    once per step."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        engine = Engine(folder, config)
    except BaseException as e:
        out.send(StartFailed(f"the engine did not start: {type(e).__name__}: {e}\n{traceback.format_exc()}"))
        return
    box = _Outbox(out, engine)
    engine.on_flush = box.send  # inside step(), while the GPU runs the step just launched
    box.post(Ready(engine.max_model_len, engine.snapshot()))
    try:
        while not box.broken:
            while cmd.poll():
                message = cmd.recv()
                if isinstance(message, Stop):
                    engine.shutdown()
                    box.send()
                    box.post(Stopped())
                    box.close()
                    return
                if isinstance(message, AddRequests):
                    for request in message.requests:
                        _add(engine, box, request)
                elif isinstance(message, Abort):
                    engine.abort(message.request_id)
            busy = engine.step_or_fail()
            box.send()
            if engine.down:  # nothing more can run here: exit, and the parent starts a new engine process
                log.error("fastserve: %s; the engine process exits to be restarted", engine.down)
                os._exit(70)
            if not busy and not engine.has_work():
                wait([cmd], timeout=_IDLE_WAIT_S)
    except (EOFError, OSError, BrokenPipeError):
        return  # the server went away


def _add(engine: Engine, box: _Outbox, request: NewRequest) -> None:
    try:
        engine.submit(Submission(request.request_id, request.prompt_ids, request.params, box.put, request.priority))
    except Exception as e:  # checked in the parent already; this is a race (a full queue) or a bug
        log.exception("fastserve: request %s refused in the engine process", request.request_id)
        box.put(RequestOutput(request.request_id, "", [], True, "error", len(request.prompt_ids), 0, error=str(e)))
