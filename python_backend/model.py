"""The Triton Python-backend model: a thin, decoupled adapter over the engine.

execute() checks each request, hands it to the engine and returns at once. The engine runs in a
process of its own (engine_process.py; parameter engine_process, default true) or, with
engine_process false, on a thread of this one. Its outputs go into a queue; a response thread sends
them with each request's response sender, watches for cancelled requests, and keeps the metrics, so
the engine never waits on a slow client. When sending falls behind, a stream's queued outputs go as
one response. One sending thread only: the Python backend of nvidia-pytriton 0.7 crashes the server
when two threads send at once.
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from python_backend.engine import config as settings
from python_backend.engine.client import EngineUnavailable, Overloaded, Submission
from python_backend.engine.config import EngineConfig, ServingConfig
from python_backend.engine.engine import Engine
from python_backend.engine.engine_folder import EngineFolderError
from python_backend.engine.engine_process import EngineProcess
from python_backend.engine.sequence import RequestOutput, SamplingError
from python_backend.metrics import Metrics
from python_backend.request import GenerateRequest, parse
from python_backend.triton_logs import route_logs

_STOP = object()
_CANCEL_POLL_S = 0.05
_CANCEL_CHECKS_PER_TICK = 32
_CANCEL_RECHECK_S = 0.25  # a request is asked again no sooner than this
# each metric update is a round trip to the server, paid in CPU time the engine could use: counters
# and gauges move every quarter second, well within any scrape interval
_METRICS_S = 0.25


@dataclass
class _Active:
    """What the response thread keeps for one request in flight."""

    sender: object
    request: object
    req: GenerateRequest
    prompt: str
    arrival: float
    text: str = ""
    pending_tokens: int = 0  # streamed tokens held back by stream_interval
    first_token_time: float | None = None
    cancel_sent: bool = False
    next_cancel_check: float = 0.0
    done: bool = False


@dataclass
class _Refusal:
    """A request execute() turned away; the response thread sends the error (see _respond_loop)."""

    sender: object
    error: Exception


def _tensor(name: str, value, dtype) -> pb_utils.Tensor:
    return pb_utils.Tensor(name, np.array([[value]], dtype=dtype))


def _merge(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """Two consecutive outputs of one request as one: the later state, the text of both."""
    logprobs = None if a.logprobs is None and b.logprobs is None else (a.logprobs or []) + (b.logprobs or [])
    return RequestOutput(
        b.request_id,
        a.text + b.text,
        a.token_ids + b.token_ids,
        b.finished,
        b.finish_reason,
        b.num_input_tokens,
        b.num_output_tokens,
        b.num_cached_tokens,
        logprobs,
        b.error,
        b.unavailable,
    )


def _drain(outbox: queue.SimpleQueue, first) -> tuple[list[RequestOutput | _Refusal], bool]:
    """Everything queued now: refusals, then one output per request. When sending falls behind the
    engine, streams get fewer, larger deltas instead of a growing backlog."""
    merged: dict[str, RequestOutput] = {}
    refusals: list[_Refusal] = []
    stop = False
    item = first
    while True:
        if item is _STOP:
            stop = True
            break
        if isinstance(item, _Refusal):
            refusals.append(item)
        else:
            prev = merged.get(item.request_id)
            merged[item.request_id] = item if prev is None else _merge(prev, item)
        try:
            item = outbox.get_nowait()
        except queue.Empty:
            break
    return [*refusals, *merged.values()], stop


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        route_logs()
        self.model_config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in self.model_config.get("parameters", {}).items()}
        try:
            settings.check_keys(params)
            config = EngineConfig.from_parameters(params)
            self.serving = ServingConfig.from_parameters(params)
        except ValueError as e:
            raise pb_utils.TritonModelException(f"config.pbtxt: {e}") from None
        engine_dir = Path(self.serving.engine_dir)
        if not engine_dir.is_absolute():
            engine_dir = Path(args["model_repository"]) / args["model_version"] / engine_dir
        self.stream_interval = self.serving.stream_interval
        if args.get("model_instance_kind") == "GPU":
            config.device = f"cuda:{args.get('model_instance_device_id', 0)}"
        elif config.device == "gpu":
            config.device = "cuda"
        self._restarts_seen = 0
        try:
            if self.serving.engine_process:  # the engine loop off this interpreter's lock
                self.engine = EngineProcess(engine_dir, config, restarts=self.serving.engine_restarts)
            else:
                self.engine = Engine.launch(engine_dir, config)
        except (EngineFolderError, EngineUnavailable) as e:
            raise pb_utils.TritonModelException(str(e)) from None
        self.metrics = Metrics(pb_utils, args["model_name"], args["model_version"])
        self._ids = itertools.count()
        self._active: dict[str, _Active] = {}
        self._lock = threading.Lock()
        # counts not yet added to the counters: each metric call is a round trip to the server (~70 us
        # measured on CPU), as dear as a send, so counters move once per tick
        self._tally: dict[str, int] = {}
        self._poll_cursor = 0
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._executing = threading.Event()  # set while execute() runs
        # every response, refusals from execute() included, is sent by this one thread: sends from two
        # threads at once crashed tritonserver 2.51's Python backend (SIGSEGV in libtriton_python.so)
        self._responder = threading.Thread(target=self._respond_loop, name="fastserve-responses", daemon=True)
        self._responder.start()

    # ---- requests in ----------------------------------------------------------------------------
    def execute(self, requests: list) -> None:
        """Parse every request, then hand the valid ones to the engine in one call (one tokenizer
        batch, one message to the engine process). The response thread holds back its sends
        meanwhile: they compete for the GIL, and at 256 streams they kept new requests waiting."""
        self._executing.set()
        try:
            admitted: list[tuple[str, _Active]] = []
            for request in requests:
                sender = request.get_response_sender()
                try:
                    admitted.append(self._parse(request, sender))
                except Exception as e:
                    self._outbox.put(_Refusal(sender, e))
            if admitted:
                try:
                    errors = self.engine.add_requests(
                        [
                            Submission(rid, a.prompt, a.req.params, self._outbox.put, a.req.priority)
                            for rid, a in admitted
                        ]
                    )
                except Exception as e:  # every request still gets an answer
                    errors = [e] * len(admitted)
                for (rid, a), error in zip(admitted, errors):
                    if error is not None:
                        with self._lock:
                            self._active.pop(rid, None)
                        self._outbox.put(_Refusal(a.sender, error))
        finally:
            self._executing.clear()
        return None

    def _parse(self, request, sender) -> tuple[str, _Active]:
        inputs = {t.name(): t.as_numpy() for t in request.inputs()}
        try:
            parameters = json.loads(request.parameters() or "{}")
        except json.JSONDecodeError as e:
            raise SamplingError(f"request parameters are not valid JSON: {e.msg}") from None
        req = parse(inputs, parameters)
        prompt = req.prompt
        if req.chat:
            if not getattr(self.engine.tokenizer, "chat_template", None):
                raise SamplingError("this model has no chat template; send plain text without chat")
            prompt = self.engine.tokenizer.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
        rid = f"t{next(self._ids)}"
        active = _Active(sender=sender, request=request, req=req, prompt=prompt, arrival=time.perf_counter())
        with self._lock:  # known before the engine can answer
            self._active[rid] = active
        return rid, active

    def _refuse(self, sender, error: Exception) -> None:
        """A request that will not run: a clear error for its client; the server keeps serving."""
        if isinstance(error, SamplingError):
            self._fail(sender, str(error), pb_utils.TritonError.INVALID_ARG)
        elif isinstance(error, (Overloaded, EngineUnavailable)):
            self._fail(sender, str(error), pb_utils.TritonError.UNAVAILABLE)
        else:  # never let one request take the model down
            self._fail(sender, f"internal error: {type(error).__name__}: {error}", pb_utils.TritonError.INTERNAL)

    @staticmethod
    def _fail(sender, message: str, code) -> None:
        error = pb_utils.TritonError(message, code)
        sender.send(pb_utils.InferenceResponse(error=error), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    # ---- responses out --------------------------------------------------------------------------
    def _respond_loop(self) -> None:
        next_poll = next_metrics = 0.0
        while True:
            try:
                item = self._outbox.get(timeout=_CANCEL_POLL_S)
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            if item is not None:
                batch, stop = _drain(self._outbox, item)
                for out in batch:
                    self._yield_to_execute()
                    if isinstance(out, _Refusal):
                        try:
                            self._refuse(out.sender, out.error)
                        except Exception as e:
                            pb_utils.Logger.log_warn(f"fastserve: refusing a request failed: {e}")
                        continue
                    try:
                        self._respond(out)
                    except Exception as e:  # a dropped client: stop its sequence, keep serving the rest
                        self._drop(out, e)
                if stop:
                    return
            now = time.perf_counter()
            if now >= next_poll:
                next_poll = now + _CANCEL_POLL_S
                try:
                    self._poll_cancelled()
                    if now >= next_metrics:
                        next_metrics = now + _METRICS_S
                        self._flush_tallies()
                        self.metrics.engine_state(self.engine.snapshot())
                        self._engine_health()
                except Exception as e:
                    pb_utils.Logger.log_error(f"fastserve: response thread: {type(e).__name__}: {e}")

    def _engine_health(self) -> None:
        """Count engine restarts and say whether an engine is up. Triton's Python backend gives a model
        no call to mark itself not ready, so /v2/models/<name>/ready stays 200 while the engine is
        down; requests then fail with UNAVAILABLE and this gauge reads 0."""
        restarts = getattr(self.engine, "restarts", 0)
        if restarts > self._restarts_seen:
            self.metrics.engine_restarts.increment(restarts - self._restarts_seen)
            self._restarts_seen = restarts
        self.metrics.set_engine_up(getattr(self.engine, "up", True))

    def _yield_to_execute(self) -> None:
        """Wait (up to 0.2 s) while execute() admits requests."""
        deadline = time.perf_counter() + 0.2
        while self._executing.is_set() and time.perf_counter() < deadline:
            time.sleep(0.0002)

    def _drop(self, out: RequestOutput, error: Exception) -> None:
        """Sending failed: stop the sequence and, if this was its end, still close the stream."""
        self.engine.abort(out.request_id)
        pb_utils.Logger.log_warn(f"fastserve: response for {out.request_id} failed: {error}")
        if out.finished:
            with self._lock:
                a = self._active.pop(out.request_id, None)
            if a is not None:
                try:
                    a.sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                except Exception:
                    pass

    def _count(self, key: str, n: int = 1) -> None:
        self._tally[key] = self._tally.get(key, 0) + n

    def _flush_tallies(self) -> None:
        """Called by the response thread only (and by finalize once it has stopped)."""
        tally, self._tally = self._tally, {}
        for key, n in tally.items():
            if key.startswith("finished:"):
                self.metrics.finished(key.split(":", 1)[1], n)
            elif n:
                getattr(self.metrics, key).increment(n)

    def _poll_cancelled(self) -> None:
        """Ask the requests in flight, in turn, whether their clients cancelled them. Each
        is_cancelled() is a round trip to the server that costs the server and this process CPU
        time the engine would otherwise have, so a request is asked at most every
        _CANCEL_RECHECK_S, and at most _CANCEL_CHECKS_PER_TICK requests per tick: a cancelled
        stream is seen within 0.25 s, or 0.4 s among 256 streams."""
        with self._lock:
            active = list(self._active.items())
        if not active:
            return
        now = time.perf_counter()
        start = self._poll_cursor % len(active)
        checked = 0
        for i, (rid, a) in enumerate(active[start:] + active[:start]):
            if checked == _CANCEL_CHECKS_PER_TICK:
                self._poll_cursor = start + i
                return
            if a.cancel_sent or a.next_cancel_check > now:
                continue
            a.next_cancel_check = now + _CANCEL_RECHECK_S
            checked += 1
            if a.request.is_cancelled():
                a.cancel_sent = True
                self.engine.abort(rid)
        self._poll_cursor = start

    def _respond(self, out: RequestOutput) -> None:
        with self._lock:
            a = self._active.get(out.request_id)
        if a is None or a.done:
            return
        now = time.perf_counter()
        n_new = len(out.token_ids)
        if n_new and out.finish_reason != "cancelled":
            if a.first_token_time is None:
                a.first_token_time = now
                self.metrics.ttft.observe(now - a.arrival)
            self._count("generation_tokens", n_new)
        if out.finished:
            with self._lock:
                self._active.pop(out.request_id, None)
            a.done = True
            self._count("prompt_tokens", out.num_input_tokens)
            self._count(f"finished:{out.finish_reason or 'unknown'}")
            self.metrics.e2e.observe(now - a.arrival)
            if a.first_token_time is not None and out.num_output_tokens > 1:
                self.metrics.itl.observe((now - a.first_token_time) / (out.num_output_tokens - 1))
        req = a.req
        if req.stream:
            # stream_interval > 1: one response per that many tokens, fewer sends at high concurrency
            a.text += out.text
            a.pending_tokens += n_new
            if not out.finished and (not a.text or a.pending_tokens < self.stream_interval):
                return
            text, a.text, a.pending_tokens = a.text, "", 0
        else:
            a.text += out.text
            if not out.finished:
                return
            text = a.text if req.exclude_input_in_output or req.chat else req.prompt + a.text
        if out.finish_reason == "error":
            code = pb_utils.TritonError.UNAVAILABLE if out.unavailable else pb_utils.TritonError.INTERNAL
            self._fail(a.sender, out.error or "the engine failed while generating", code)
            return
        tensors = [_tensor("text_output", text.encode("utf-8"), np.object_)]
        if out.finished:
            tensors.append(_tensor("finish_reason", out.finish_reason.encode(), np.object_))
        if out.finished or req.return_num_input_tokens:
            tensors.append(_tensor("num_input_tokens", out.num_input_tokens, np.uint32))
        if out.finished or req.return_num_output_tokens:
            tensors.append(_tensor("num_output_tokens", out.num_output_tokens, np.uint32))
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if out.finished else 0
        a.sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=flags)
        self._count("responses")

    def finalize(self) -> None:
        self.engine.shutdown()  # requests in flight end as 'cancelled' and get their FINAL flag
        self._outbox.put(_STOP)
        self._responder.join(timeout=30)
        self._flush_tallies()
