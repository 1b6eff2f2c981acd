"""A thin client for FastServe models on Triton.

    from clients.client import Client
    c = Client("localhost:8001")                       # gRPC (default) or Client("localhost:8000", "http")
    print(c.generate("The capital of France is", max_tokens=16).text)
    for piece in c.stream("Tell me a story", max_tokens=64):
        print(piece, end="", flush=True)
    c.chat([{"role": "user", "content": "Hi!"}])

gRPC goes through tritonclient's bidirectional stream (Triton's gRPC ModelInfer refuses decoupled
models); HTTP goes through Triton's generate and generate_stream endpoints (its /infer refuses them
too). Async versions: agenerate, astream, achat.

A pool entry takes the same calls: `generate(..., model="member")` pins a member,
`quality_weight=0.9` leans this request towards quality, and the answer names the member that
served it and the request id that `feedback(request_id, reward)` rates.
"""

from __future__ import annotations

import json
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import numpy as np

from python_backend.tensors import POOL_CONTROLS, REQUEST_FIELDS

_WIRE = {  # Triton config type -> (wire datatype, numpy dtype)
    "TYPE_INT32": ("INT32", np.int32),
    "TYPE_FP32": ("FP32", np.float32),
    "TYPE_UINT64": ("UINT64", np.uint64),
    "TYPE_BOOL": ("BOOL", np.bool_),
}
# the model's scalar inputs, from their one declaration
_TYPES = {f.name: _WIRE[f.tensor] for f in REQUEST_FIELDS if f.tensor in _WIRE}
# a pool's own inputs: string ones go as BYTES
_TYPES.update({s.name: _WIRE[s.data_type] for s in POOL_CONTROLS if s.data_type in _WIRE})
_STRINGS = {s.name for s in POOL_CONTROLS if s.data_type == "TYPE_STRING"}
_FEEDBACK = {"request_id", "reward"}  # feedback(), not generation settings
RESULTS = ("finish_reason", "num_input_tokens", "num_output_tokens", "served_by", "request_id")


class GenerateError(RuntimeError):
    """The server refused or failed the request; the message is the server's."""


@dataclass
class Generation:
    text: str
    finish_reason: str | None
    num_input_tokens: int | None
    num_output_tokens: int | None
    served_by: str | None = None  # a pool's answers: the member that served it
    request_id: str | None = None  # a pool's answers: what feedback() rates


_PARAMETERS = ("ignore_eos",)  # settings sent as request parameters rather than tensors


def request_settings(max_tokens: int | None, stop: list[str] | None, kw: dict) -> dict:
    """A request's settings by their model-side names, refusing names the model does not take."""
    settings = {"max_tokens": max_tokens, **kw}
    settings = {k: v for k, v in settings.items() if v is not None}
    unknown = sorted(set(settings) - set(_TYPES) - _STRINGS - set(_PARAMETERS) | set(settings) & _FEEDBACK)
    if unknown:
        raise TypeError(f"unknown generation settings: {', '.join(unknown)}")
    if stop:
        settings["stop_words"] = list(stop)
    return settings


def grpc_inputs(prompt: str | None, settings: dict, chat: bool) -> tuple[list, dict]:
    """The input tensors and request parameters of one request over gRPC (tritonclient's sync and
    asyncio clients take the same InferInput objects)."""
    import tritonclient.grpc as grpcclient

    inputs = []

    def add(name: str, datatype: str, array: np.ndarray) -> None:
        t = grpcclient.InferInput(name, list(array.shape), datatype)
        t.set_data_from_numpy(array)
        inputs.append(t)

    if prompt is not None:
        add("text_input", "BYTES", np.array([[prompt.encode()]], dtype=np.object_))
    params = {"chat": True} if chat else {}
    for name, value in settings.items():
        if name in _PARAMETERS:
            params[name] = value
        elif name in _STRINGS:
            add(name, "BYTES", np.array([[str(value).encode()]], dtype=np.object_))
        elif name == "stop_words":
            add(name, "BYTES", np.array([[w.encode() for w in value]], dtype=np.object_))
        else:
            datatype, dtype = _TYPES[name]
            add(name, datatype, np.array([[value]], dtype=dtype))
    return inputs, params


def response_fields(result) -> dict:
    """One gRPC response's outputs as Python values (text_output decoded)."""
    out = {k: _first(result.as_numpy(k)) for k in RESULTS if result.as_numpy(k) is not None}
    text = result.as_numpy("text_output")
    if text is not None:
        out["text_output"] = text.reshape(-1)[0].decode("utf-8")
    return out


class _GrpcStream:
    """One open bidirectional stream, reused by one thread for one request after another: opening a
    channel and a stream per request cost more than a whole short request at 256 streams."""

    def __init__(self, url: str):
        import tritonclient.grpc as grpcclient

        self.responses: queue.SimpleQueue = queue.SimpleQueue()
        self.client = grpcclient.InferenceServerClient(url)
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def close(self, cancel: bool = False) -> None:
        try:
            self.client.stop_stream(cancel_requests=cancel)
        finally:
            self.client.close()


class Client:
    """Safe to share between threads. Over gRPC each request opens a stream of its own, unless its
    thread called connect(): then the thread's requests reuse one stream until close()."""

    def __init__(
        self, url: str = "localhost:8001", protocol: str = "grpc", model: str = "smollm2", timeout: float = 600.0
    ):
        if protocol not in ("grpc", "http"):
            raise ValueError("protocol must be 'grpc' or 'http'")
        self.url, self.protocol, self.model, self.timeout = url, protocol, model, timeout
        self._local = threading.local()
        self._streams: set[_GrpcStream] = set()
        self._streams_lock = threading.Lock()

    def connect(self) -> None:
        """Open a gRPC stream that this thread's requests reuse until close() (load generators,
        long-lived apps). Open streams keep the interpreter from exiting: close() them."""
        if self.protocol == "grpc" and getattr(self._local, "stream", None) is None:
            stream = self._local.stream = _GrpcStream(self.url)
            with self._streams_lock:
                self._streams.add(stream)

    def close(self) -> None:
        """Close every gRPC stream this client opened."""
        with self._streams_lock:
            streams, self._streams = self._streams, set()
        for stream in streams:
            stream.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _discard(self, stream: _GrpcStream, cancel: bool) -> None:
        if getattr(self._local, "stream", None) is stream:
            self._local.stream = None
        with self._streams_lock:
            self._streams.discard(stream)
        stream.close(cancel)

    # ---- gRPC -----------------------------------------------------------------------------------
    def _grpc_stream(self, prompt: str | None, settings: dict, chat: bool) -> Iterator[dict]:

        kept = getattr(self._local, "stream", None)
        stream = kept or _GrpcStream(self.url)
        request_id = uuid.uuid4().hex
        done = False
        try:
            inputs, params = grpc_inputs(prompt, settings, chat)
            stream.client.async_stream_infer(
                self.model, inputs, request_id=request_id, parameters=params, enable_empty_final_response=True
            )
            while True:
                try:
                    result, error = stream.responses.get(timeout=self.timeout)
                except queue.Empty:
                    raise GenerateError(f"no response within {self.timeout:.0f} s") from None
                if error is not None:
                    raise GenerateError(str(error))
                response = result.get_response()
                if response.id != request_id:
                    continue  # a late response of an earlier request on this stream
                final = response.parameters.get("triton_final_response")
                is_final = bool(final and final.bool_param)
                out = response_fields(result)
                if out:
                    yield out
                if is_final:
                    done = True
                    return
        finally:
            if kept is None:
                stream.close(cancel=not done)
            elif not done:  # abandoned or failed: cancel what is in flight; reconnect for the next request
                self._discard(stream, cancel=True)
                self.connect()

    # ---- HTTP -----------------------------------------------------------------------------------
    def _http_body(self, prompt: str | None, settings: dict, chat: bool) -> bytes:
        body = {**({} if prompt is None else {"text_input": prompt}), **settings}
        if chat:
            body["chat"] = True
        return json.dumps(body).encode()

    def _http_stream(self, prompt: str | None, settings: dict, chat: bool) -> Iterator[dict]:
        import http.client

        host, _, port = self.url.replace("http://", "").partition(":")
        conn = http.client.HTTPConnection(host, int(port or 80), timeout=self.timeout)
        try:
            stream = settings.get("stream", False)
            path = f"/v2/models/{self.model}/{'generate_stream' if stream else 'generate'}"
            conn.request(
                "POST", path, body=self._http_body(prompt, settings, chat), headers={"Content-Type": "application/json"}
            )
            resp = conn.getresponse()
            if not stream:
                data = json.loads(resp.read() or b"{}")
                if resp.status != 200 or "error" in data:
                    raise GenerateError(data.get("error", f"HTTP {resp.status}"))
                yield data
                return
            for raw in resp:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = json.loads(line[5:])
                if "error" in data:
                    raise GenerateError(data["error"])
                yield data
        finally:
            conn.close()

    # ---- the API --------------------------------------------------------------------------------
    def responses(self, prompt: str, max_tokens: int, stop, stream: bool, chat: bool, kw: dict) -> Iterator[dict]:
        """The raw responses as dicts (text_output, and on the last one finish_reason and counts)."""
        settings = request_settings(max_tokens, stop, kw)
        settings["stream"] = stream
        if self.protocol == "grpc":
            return self._grpc_stream(prompt, settings, chat)
        return self._http_stream(prompt, settings, chat)

    def generate(
        self, prompt: str, max_tokens: int = 64, stop: list[str] | None = None, chat: bool = False, **kw
    ) -> Generation:
        """The whole generated text (without the prompt) and the counts."""
        kw.setdefault("exclude_input_in_output", True)
        text, last = "", {}
        for r in self.responses(prompt, max_tokens, stop, False, chat, kw):
            text += r.get("text_output", "")
            last = r
        return Generation(
            text,
            last.get("finish_reason"),
            _int(last.get("num_input_tokens")),
            _int(last.get("num_output_tokens")),
            last.get("served_by"),
            last.get("request_id"),
        )

    def feedback(self, request_id: str, reward: float) -> str:
        """Rate a pool's answer (the request_id it came with) with a reward in [0, 1]; returns the
        member credited. A GenerateError carries the pool's refusal (unknown id, reward out of range)."""
        settings = {"request_id": request_id, "reward": float(reward)}
        stream = self._grpc_stream if self.protocol == "grpc" else self._http_stream
        last: dict = {}
        for r in stream(None, settings, False):
            last = r
        if not last.get("served_by"):
            raise GenerateError(f"{self.model} answered feedback without naming a member: is it a pool?")
        return str(last["served_by"])

    def stream(
        self, prompt: str, max_tokens: int = 64, stop: list[str] | None = None, chat: bool = False, **kw
    ) -> Iterator[str]:
        """Text deltas as the server makes them."""
        for r in self.responses(prompt, max_tokens, stop, True, chat, kw):
            if r.get("text_output"):
                yield r["text_output"]

    def chat(self, messages: list[dict], max_tokens: int = 256, **kw) -> Generation:
        return self.generate(json.dumps(messages), max_tokens=max_tokens, chat=True, **kw)

    async def agenerate(self, prompt: str, max_tokens: int = 64, **kw) -> Generation:
        import asyncio

        return await asyncio.to_thread(self.generate, prompt, max_tokens, **kw)

    async def achat(self, messages: list[dict], max_tokens: int = 256, **kw) -> Generation:
        import asyncio

        return await asyncio.to_thread(self.chat, messages, max_tokens, **kw)

    async def astream(self, prompt: str, max_tokens: int = 64, **kw) -> AsyncIterator[str]:
        """Deltas for asyncio callers: the blocking stream runs in a worker thread."""
        import asyncio

        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        done = object()

        def pump() -> None:
            try:
                for piece in self.stream(prompt, max_tokens, **kw):
                    loop.call_soon_threadsafe(q.put_nowait, piece)
            except Exception as e:  # handed to the caller below
                loop.call_soon_threadsafe(q.put_nowait, e)
            loop.call_soon_threadsafe(q.put_nowait, done)

        threading.Thread(target=pump, daemon=True).start()
        while True:
            item = await q.get()
            if item is done:
                return
            if isinstance(item, Exception):
                raise item
            yield item


def _first(array):
    if array is None:
        return None
    value = array.reshape(-1)[0]
    return value.decode() if isinstance(value, bytes) else value.item()


def _int(value) -> int | None:
    return None if value is None else int(value)
