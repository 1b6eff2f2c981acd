"""The pool's Triton Python-backend model: one entry in front of several generate models.

execute() checks each request as a member would (so a bad one is refused before routing, with the
member's own message), ranks the members for it, and hands it to a worker thread that streams the
chosen member's answer through the server's gRPC port (pool/transport.py says why not BLS), adding
`served_by` and `request_id`. A member that
answers an error before its first output (unloaded, not ready, UNAVAILABLE) is marked down for a
while and the next one is tried. A request carrying `request_id` and `reward` is feedback, not
generation. One thread sends every response and every metric: two threads talking to the server at
once (sends, metric updates) crash the Python backend of tritonserver 2.51.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from python_backend.engine.sequence import SamplingError
from python_backend.pool.cache import CachedAnswer, ResponseCache, cache_key
from python_backend.pool.features import prompt_features
from python_backend.pool.metrics import PoolMetrics
from python_backend.pool.router import FeedbackError, PoolConfig, PoolConfigError, Router
from python_backend.pool.transport import Call, MemberCalls, member_url
from python_backend.request import parse
from python_backend.tensors import OUTPUTS, POOL_CONTROLS
from python_backend.triton_logs import route_logs

log = logging.getLogger("fastserve.pool")
MEMBER_OUTPUTS = [t.name for t in OUTPUTS]
CONTROL_NAMES = {t.name for t in POOL_CONTROLS}
_STOP = object()
_DOWN_S = 5.0  # a member that failed is skipped this long, then tried again
_WATCH_S = 1.0  # how often the pool file is checked for changes
_RETRYABLE = ("not found", "unknown model", "not ready", "unavailable", "is not loaded", "overloaded")


@dataclass
class _Job:
    request: object
    sender: object
    inputs: dict[str, np.ndarray]  # what the member receives
    parameters: dict
    stream: bool
    features: np.ndarray
    max_tokens: int
    pinned: str | None
    quality_weight: float | None
    cache: str | None  # the cache key, for deterministic requests
    want_output_tokens: bool
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Out:
    """One send, made by the sending thread: tensors, an error, and/or the final flag."""

    sender: object
    tensors: dict[str, np.ndarray] | None = None
    error: tuple[str, object] | None = None  # (message, TritonError code)
    final: bool = False
    job: _Job | None = None


def _scalar(inputs: dict, parameters: dict, name: str):
    if name in inputs:
        flat = np.asarray(inputs[name]).reshape(-1)
        if flat.size != 1:
            raise SamplingError(f"input {name} must hold one value per request, got {flat.size}")
        v = flat[0]
        return v.decode("utf-8") if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v
    return parameters.get(name)


def _text(tensor) -> str:
    v = np.asarray(tensor).reshape(-1)
    if v.size == 0:
        return ""
    return v[0].decode("utf-8", errors="replace") if isinstance(v[0], bytes) else str(v[0])


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        route_logs()
        self.name = args["model_name"]
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        entry = Path(args["model_repository"])
        self.pool_file = entry / params.get("pool_file", "pool.json")
        state = params.get("state_file", "router_state.json")
        try:
            self._pool_stamp = _stamp(self.pool_file)
            pool = self._read_pool_file()
            self.router = Router(pool, entry / state if state else None)
        except (OSError, PoolConfigError) as e:
            raise pb_utils.TritonModelException(f"pool {self.name}: {self.pool_file}: {e}") from None
        self.calls = MemberCalls(member_url(params))
        self.cache = ResponseCache(pool.cache_size)
        self.metrics = PoolMetrics(pb_utils, self.name)
        self._down: dict[str, float] = {}
        self._lock = threading.Lock()
        # held by execute() and by the sending thread whenever they use the backend's API, so the two
        # never call into it at once (pool/transport.py says what concurrent calls did)
        self._backend = threading.Lock()
        self._active: dict[str, _Job] = {}
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._workers = ThreadPoolExecutor(
            max_workers=int(params.get("max_in_flight", "64")), thread_name_prefix="pool"
        )
        self._published = 0.0  # when the estimates and the state were last published
        self._stop = threading.Event()
        self._sender = threading.Thread(target=self._send_loop, name="pool-send", daemon=True)
        self._sender.start()
        self._watcher = threading.Thread(target=self._watch_pool_file, name="pool-watch", daemon=True)
        self._watcher.start()
        log.info("pool %s: members %s", self.name, ", ".join(self.router.members))

    # ---- requests in ----------------------------------------------------------------------------
    def execute(self, requests: list) -> None:
        with self._backend:
            self._take(requests)

    def _take(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                job = self._admit(request, sender)
            except (SamplingError, FeedbackError) as e:
                self._outbox.put(_Out(sender, error=(str(e), pb_utils.TritonError.INVALID_ARG), final=True))
                continue
            except Exception as e:  # never let one request take the pool down
                message = f"internal error: {type(e).__name__}: {e}"
                self._outbox.put(_Out(sender, error=(message, pb_utils.TritonError.INTERNAL), final=True))
                continue
            if job is not None:
                with self._lock:
                    self._active[job.request_id] = job
                self._workers.submit(self._serve, job)
        return None

    def _admit(self, request, sender) -> _Job | None:
        inputs = {t.name(): t.as_numpy() for t in request.inputs()}
        try:
            parameters = json.loads(request.parameters() or "{}")
        except json.JSONDecodeError as e:
            raise SamplingError(f"request parameters are not valid JSON: {e.msg}") from None
        reward = _scalar(inputs, parameters, "reward")
        if reward is not None:
            rid = _scalar(inputs, parameters, "request_id")
            if not rid:
                raise FeedbackError("feedback needs the request_id that came with the answer, and a reward")
            if isinstance(reward, str):
                try:
                    reward = float(reward)
                except ValueError:
                    raise FeedbackError(f"reward must be a number in [0, 1], got {reward!r}") from None
            member = self.router.feedback(str(rid), float(reward))
            self.metrics.rewarded(member, float(reward))
            self._outbox.put(_Out(sender, {"served_by": member, "request_id": str(rid)}, final=True))
            return None
        req = parse(inputs, parameters)  # the member's own checks and messages
        pinned = _scalar(inputs, parameters, "model")
        if pinned is not None and pinned not in self.router.members:
            raise SamplingError(
                f"model {pinned!r} is not a member of pool {self.name}: {', '.join(self.router.members)}"
            )
        qw = _scalar(inputs, parameters, "quality_weight")
        if qw is not None:
            try:
                qw = float(qw)
            except (TypeError, ValueError):
                raise SamplingError(f"quality_weight must be a number in [0, 1], got {qw!r}") from None
            if not 0.0 <= qw <= 1.0:
                raise SamplingError(f"quality_weight must be in [0, 1], got {qw}")
        text = " ".join(m["content"] for m in req.messages) if req.chat else req.prompt
        member_inputs = {k: v for k, v in inputs.items() if k not in CONTROL_NAMES}
        member_inputs["return_num_output_tokens"] = np.array([[True]], dtype=bool)
        member_params = {
            k: str(v) if isinstance(v, float) else v for k, v in parameters.items() if k not in CONTROL_NAMES
        }
        deterministic = req.params.temperature == 0.0 and self.cache.size > 0
        return _Job(
            request=request,
            sender=sender,
            inputs=member_inputs,
            parameters=member_params,
            stream=req.stream,
            features=prompt_features(text, req.chat, req.params.max_tokens),
            max_tokens=req.params.max_tokens,
            pinned=pinned,
            quality_weight=qw,
            cache=cache_key(member_inputs, member_params, pinned) if deterministic else None,
            want_output_tokens=req.return_num_output_tokens,
        )

    # ---- routing and streaming (worker threads) -------------------------------------------------
    def _serve(self, job: _Job) -> None:
        try:
            if job.cache is not None:
                hit = self.cache.get(job.cache)
                if hit is not None and hit.member in self.router.members:
                    self.metrics.cache_hit()
                    self.router.routed(job.request_id, hit.member, job.features)
                    self._emit(job, hit.member, hit.outputs)
                    self._outbox.put(_Out(job.sender, final=True, job=job))
                    return
            last = "no member is loaded"
            for member in self._order(job):
                outcome, message = self._stream(job, member)
                if outcome == "retry":
                    last = f"{member}: {message}"
                    if job.pinned:
                        break
                    with self._lock:
                        self._down[member] = time.monotonic() + _DOWN_S
                    self.metrics.failover()
                    log.warning("pool %s: %s failed (%s); trying the next member", self.name, member, message)
                    continue
                return
            self._outbox.put(
                _Out(job.sender, error=(f"no member of pool {self.name} could serve this request; last: {last}",
                                        pb_utils.TritonError.UNAVAILABLE), final=True, job=job)
            )  # fmt: skip
        except Exception as e:
            log.exception("pool %s: request failed", self.name)
            message = f"internal error: {type(e).__name__}: {e}"
            self._outbox.put(_Out(job.sender, error=(message, pb_utils.TritonError.INTERNAL), final=True, job=job))

    def _order(self, job: _Job) -> list[str]:
        if job.pinned:
            return [job.pinned]
        now = time.monotonic()
        with self._lock:
            down = {m for m, until in self._down.items() if until > now}
        ranked = self.router.rank(job.features, job.max_tokens, job.quality_weight, exclude=down)
        order = [c.member for c in ranked]
        # members marked down last, in case they are back: no request fails while one can serve it
        return order + [m for m in self.router.members if m not in order]

    def _stream(self, job: _Job, member: str) -> tuple[str, str]:
        """Stream `member`'s answer to the client. ("retry", why) when it failed before any output."""
        if job.cancelled.is_set():  # cancelled while waiting for a worker
            self._outbox.put(_Out(job.sender, final=True, job=job))
            return "done", ""
        call = Call(member, f"{job.request_id}-{member}", job.inputs, job.parameters, MEMBER_OUTPUTS)
        tracker = self.router.latency(member)
        load = tracker.started()
        start = time.perf_counter()
        first: float | None = None
        tokens = 0
        parts: list[str] = []
        final_tensors: dict[str, np.ndarray] = {}
        settled = False
        replies = self.calls.stream(call, job.cancelled)
        try:
            for reply in replies:
                if reply.error is not None:
                    retryable = reply.status == "UNAVAILABLE" or any(r in reply.error.lower() for r in _RETRYABLE)
                    if first is None and retryable:
                        return "retry", reply.error
                    code = getattr(pb_utils.TritonError, reply.status, pb_utils.TritonError.INTERNAL)
                    self._outbox.put(_Out(job.sender, error=(reply.error, code), final=True, job=job))
                    return "failed", reply.error
                outputs = reply.outputs
                if first is None:
                    first = time.perf_counter() - start
                    self.router.routed(job.request_id, member, job.features)  # feedback may come mid-stream
                    self.metrics.routed(member)
                if "num_output_tokens" in outputs:
                    tokens = int(np.asarray(outputs["num_output_tokens"]).reshape(-1)[0])
                if "text_output" in outputs:
                    parts.append(_text(outputs["text_output"]))
                final_tensors.update(outputs)
                if not job.want_output_tokens and "finish_reason" not in outputs:
                    outputs.pop("num_output_tokens", None)
                self._emit(job, member, outputs)
            if job.cancelled.is_set():
                self._outbox.put(_Out(job.sender, final=True, job=job))
                return "done", ""
            if first is None:
                return "retry", "the member ended without an answer"
            tracker.finished(first, time.perf_counter() - start, tokens, streamed=job.stream, load=load)
            settled = True
        finally:
            replies.close()  # a return from inside the loop: the call's stream closes now
            if not settled:
                tracker.abandoned()
        reason = _text(final_tensors.get("finish_reason", np.array([[b""]], dtype=np.object_)))
        if job.cache is not None and reason in ("stop", "length"):  # whole answers only
            whole = dict(final_tensors)
            whole["text_output"] = np.array([["".join(parts).encode("utf-8")]], dtype=np.object_)
            self.cache.put(job.cache, CachedAnswer(member, whole))
        self._outbox.put(_Out(job.sender, final=True, job=job))
        return "done", ""

    def _emit(self, job: _Job, member: str, outputs: dict[str, np.ndarray]) -> None:
        tensors = dict(outputs)
        tensors["served_by"] = member
        tensors["request_id"] = job.request_id
        self._outbox.put(_Out(job.sender, tensors))

    # ---- responses out (one thread) -------------------------------------------------------------
    def _send_loop(self) -> None:
        next_check = 0.0
        while True:
            try:
                item = self._outbox.get(timeout=0.05)
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            if item is not None:
                with self._backend:
                    self._send(item)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 0.1
                try:
                    with self._backend:
                        self._check_cancelled()
                        self._publish()
                except Exception:  # this thread sends every response: it must outlive any error
                    log.exception("pool %s: cancellation check or metrics failed", self.name)

    def _send(self, out: _Out) -> None:
        try:
            self.metrics.flush()  # before the send: a client that sees the answer sees its counts
            if out.error is not None:
                response = pb_utils.InferenceResponse(error=pb_utils.TritonError(*out.error))
            elif out.tensors is not None:
                response = pb_utils.InferenceResponse(output_tensors=[_tensor(k, v) for k, v in out.tensors.items()])
            else:
                response = None
            flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if out.final else 0
            if response is None:
                out.sender.send(flags=flags)
            else:
                out.sender.send(response, flags=flags)
        except Exception:
            log.exception("pool %s: sending a response failed", self.name)
        if out.final and out.job is not None:
            with self._lock:
                self._active.pop(out.job.request_id, None)

    def _check_cancelled(self) -> None:
        with self._lock:
            jobs = list(self._active.values())
        for job in jobs:
            if not job.cancelled.is_set() and job.request.is_cancelled():
                job.cancelled.set()  # the worker's call then closes its stream, cancelling the member's request

    def _publish(self) -> None:
        now = time.time()
        if now < self._published + 1.0:
            return
        self._published = now
        try:
            self.router.save_if_changed()
        except OSError as e:
            log.error("pool %s: saving the router's state failed: %s", self.name, e)
        plain = prompt_features("hello", False, 16)
        values = {c.member: (c.quality, c.latency_s) for c in self.router.rank(plain, 16)}
        self.metrics.estimates(values)
        self.metrics.flush()

    # ---- live configuration ---------------------------------------------------------------------
    def _read_pool_file(self) -> PoolConfig:
        try:
            config = PoolConfig.from_dict(json.loads(self.pool_file.read_text()))
        except json.JSONDecodeError as e:
            raise PoolConfigError(f"not valid JSON: {e.msg} at line {e.lineno}") from None
        if self.name in [m.name for m in config.members]:
            raise PoolConfigError(f"the pool {self.name} cannot be one of its own members")
        return config

    def _watch_pool_file(self) -> None:
        while not self._stop.wait(_WATCH_S):
            try:
                stamp = _stamp(self.pool_file)
                if stamp == self._pool_stamp:
                    continue
                self._pool_stamp = stamp
                config = self._read_pool_file()
            except (OSError, PoolConfigError) as e:
                log.error("pool %s: %s not applied, keeping the running settings: %s", self.name, self.pool_file, e)
                continue
            except Exception:
                log.exception("pool %s: reading %s failed", self.name, self.pool_file)
                continue
            for change in self.router.reconfigure(config):
                log.info("pool %s: %s", self.name, change)
            self.cache.resize(config.cache_size)

    def finalize(self) -> None:
        self._stop.set()
        with self._lock:
            for job in self._active.values():
                job.cancelled.set()  # their calls close, cancelling the members' requests
        self._workers.shutdown(wait=True, cancel_futures=False)
        self._outbox.put(_STOP)
        self._sender.join(timeout=30)
        self.router.save()


def _stamp(path: Path) -> tuple[int, int, int]:
    """What tells a changed file: modification time, size and inode (a rename-over counts)."""
    st = path.stat()
    return st.st_mtime_ns, st.st_size, st.st_ino


def _tensor(name: str, value) -> pb_utils.Tensor:
    if isinstance(value, str):
        return pb_utils.Tensor(name, np.array([[value.encode("utf-8")]], dtype=np.object_))
    return pb_utils.Tensor(name, np.asarray(value))
