"""The OpenAI-compatible API: /v1/models, /v1/completions and /v1/chat/completions over FastServe
models on Triton, with bearer keys, per-key limits, a body size limit and OpenAI's error shape."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from frontend import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_STREAMS_PER_KEY
from frontend.keys import Keys, OverLimit, Unauthorized
from frontend.protocol import ChatRequest, CompletionRequest
from frontend.triton import Delta, Triton, TritonCallError

log = logging.getLogger("fastserve.openai")


@dataclass
class FrontSettings:
    triton_url: str = "localhost:8001"
    keys: list[str] = field(default_factory=list)
    max_streams_per_key: int = DEFAULT_MAX_STREAMS_PER_KEY
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


class ApiError(Exception):
    """An answer in OpenAI's error shape with its HTTP status."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        500: "server_error",
        503: "service_unavailable",
    }

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


_STATUS = {"invalid": 400, "not_found": 404, "overloaded": 429, "unavailable": 503, "internal": 500}


def _from_triton(e: TritonCallError) -> ApiError:
    return ApiError(_STATUS.get(e.kind, 500), str(e), code=None if e.kind == "invalid" else e.kind)


class BodyLimit:
    """Refuses a request body above `limit` bytes with 413, by its Content-Length or as it arrives."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = ApiError(413, f"The request body is larger than this server's limit of {self.limit} bytes")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_large.response()(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise too_large
            return message

        await self.app(scope, limited, send)


def create_app(settings: FrontSettings) -> FastAPI:
    keys = Keys(settings.keys, settings.max_streams_per_key)
    admin_key = settings.keys[0] if settings.keys else None
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.triton = Triton(settings.triton_url, admin_key)
        yield
        await app.state.triton.close()

    app = FastAPI(title="FastServe OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.state.keys = keys

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        if e.status >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, e.message)
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return ApiError(e.status_code, str(e.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, e: RequestValidationError):
        return _validation_error(e.errors()).response()

    def caller(request: Request) -> str:
        try:
            return keys.check(request.headers.get("authorization"))
        except Unauthorized as e:
            raise ApiError(401, str(e), code="invalid_api_key") from None

    def triton(request: Request) -> Triton:
        return request.app.state.triton

    @app.get("/health")
    async def health(request: Request):
        if not await triton(request).ready():
            raise ApiError(503, f"Triton at {settings.triton_url} is not ready")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request, key: str = Depends(caller)):
        names = await _call(triton(request).models())
        return {"object": "list", "data": [_model_card(n, started) for n in names]}

    @app.get("/v1/models/{model}")
    async def model(model: str, request: Request, key: str = Depends(caller)):
        await _call(triton(request).check_model(model))
        return _model_card(model, started)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, key: str = Depends(caller)):
        prompts = _checked(lambda: (body.check_supported(), body.prompts())[1])
        settings_of = lambda j: _checked(lambda: body.model_settings(body.max_tokens, j))  # noqa: E731
        calls = [
            _Choice(i * body.n + j, prompt, {**settings_of(j), "exclude_input_in_output": not body.echo}, False)
            for i, prompt in enumerate(prompts)
            for j in range(body.n)
        ]
        return await _serve(request, key, body, calls, _CompletionShape(body.model))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request, key: str = Depends(caller)):
        prompt = _checked(lambda: (body.check_supported(), body.prompt())[1])
        calls = [
            _Choice(j, prompt, _checked(lambda j=j: body.model_settings(body.token_budget(), j)), True)
            for j in range(body.n)
        ]
        return await _serve(request, key, body, calls, _ChatShape(body.model))

    async def _serve(request: Request, key: str, body, calls: list[_Choice], shape: _Shape):
        tri = triton(request)
        await _call(tri.check_model(body.model))
        try:
            keys.acquire(key)  # one HTTP request, however many choices
        except OverLimit as e:
            raise ApiError(429, str(e), code="rate_limit_exceeded") from None
        streams = [c.start(tri, body.model, body.stream) for c in calls]

        async def cleanup() -> None:
            await _close_all(streams)
            keys.release(key)

        try:  # every call's first response, or its error, before the status line goes out
            firsts = await asyncio.gather(*(anext(s) for s in streams), return_exceptions=True)
        except BaseException:
            await cleanup()
            raise
        failed = [f for f in firsts if isinstance(f, BaseException)]
        if failed:
            await cleanup()
            if isinstance(failed[0], TritonCallError):
                raise _from_triton(failed[0])
            if isinstance(failed[0], StopAsyncIteration):
                raise ApiError(500, f"{body.model} answered nothing")
            raise failed[0]

        if not body.stream:
            try:
                deltas = [[first] for first in firsts]
                for got, stream in zip(deltas, streams):
                    async for d in stream:
                        got.append(d)
            except TritonCallError as e:
                raise _from_triton(e) from None
            finally:
                await cleanup()
            return JSONResponse(shape.whole(calls, deltas))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _events(calls, streams, firsts, shape, include_usage)
        return _Stream(events, cleanup)

    return app


@dataclass
class _Choice:
    index: int
    prompt: str
    settings: dict
    chat: bool

    def start(self, triton: Triton, model: str, stream: bool) -> AsyncIterator[Delta]:
        return triton.generate(model, self.prompt, {**self.settings, "stream": stream}, self.chat)


class _Shape:
    """How one kind of answer looks: whole, and as stream chunks."""

    def __init__(self, model: str):
        self.model = model
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    prefix = ""
    obj = ""
    chunk_obj = ""

    def envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, calls: list[_Choice], deltas: list[list[Delta]]) -> dict:
        choices = []
        for call, ds in zip(calls, deltas):
            text = "".join(d.text for d in ds)
            choices.append(self.whole_choice(call.index, text, _finish(ds[-1].finish_reason)))
        out = self.envelope(self.obj, choices)
        out["usage"] = _usage(calls, [ds[-1] for ds in deltas])
        return out

    def whole_choice(self, index: int, text: str, finish: str | None) -> dict:
        raise NotImplementedError

    def chunk_choice(self, index: int, delta: Delta, first: bool) -> list[dict]:
        raise NotImplementedError


class _CompletionShape(_Shape):
    prefix, obj, chunk_obj = "cmpl", "text_completion", "text_completion"

    def whole_choice(self, index, text, finish):
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

    def chunk_choice(self, index, delta, first):
        return [{"index": index, "text": delta.text, "logprobs": None, "finish_reason": _finish(delta.finish_reason)}]


class _ChatShape(_Shape):
    prefix, obj, chunk_obj = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def whole_choice(self, index, text, finish):
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "logprobs": None, "finish_reason": finish}

    def chunk_choice(self, index, delta, first):
        out = []
        if first or delta.text:
            content = {"role": "assistant", "content": delta.text} if first else {"content": delta.text}
            out.append({"index": index, "delta": content, "logprobs": None, "finish_reason": None})
        if delta.finish_reason:
            out.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": _finish(delta.finish_reason)})
        return out


async def _events(
    calls: list[_Choice], streams: list[AsyncIterator[Delta]], firsts: list[Delta], shape: _Shape, include_usage: bool
) -> AsyncIterator[bytes]:
    """Server-sent events: each choice's chunks as they come, then usage where asked, then [DONE].
    An error after the first chunk arrives as an error event before [DONE]."""
    last: list[Delta] = list(firsts)

    def event(choices: list[dict]) -> bytes:
        chunk = shape.envelope(shape.chunk_obj, choices)
        if include_usage:
            chunk["usage"] = None
        return b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"

    for call, first in zip(calls, firsts):
        for choice in shape.chunk_choice(call.index, first, True):
            yield event([choice])
    try:
        async for i, delta in _merge(
            [s for s, f in zip(streams, firsts) if not f.finish_reason],
            [k for k, f in enumerate(firsts) if not f.finish_reason],
        ):
            last[i] = delta
            for choice in shape.chunk_choice(calls[i].index, delta, False):
                yield event([choice])
    except TritonCallError as e:
        yield b"data: " + json.dumps(_from_triton(e).body()).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"
        return
    if include_usage:
        chunk = shape.envelope(shape.chunk_obj, [])
        chunk["usage"] = _usage(calls, last)
        yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


async def _merge(streams: list[AsyncIterator[Delta]], ids: list[int]) -> AsyncIterator[tuple[int, Delta]]:
    """Interleave several calls' deltas as they arrive, each tagged with its call's position."""
    if len(streams) == 1:
        async for d in streams[0]:
            yield ids[0], d
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[Delta]) -> None:
        try:
            async for d in stream:
                await queue.put((i, d))
        except TritonCallError as e:
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in zip(ids, streams)]
    try:
        open_ = len(tasks)
        while open_:
            i, item = await queue.get()
            if item is done:
                open_ -= 1
            elif isinstance(item, TritonCallError):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Stream(StreamingResponse):
    """A streamed answer that, however it ends (done, failed, or the client gone), closes its calls,
    which cancels what is still running in the model, and gives back the key's slots."""

    def __init__(self, events: AsyncIterator[bytes], cleanup: Callable[[], Awaitable[None]]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._cleanup()


async def _close_all(streams: list) -> None:
    for s in streams:
        with contextlib.suppress(Exception):
            await s.aclose()


async def _call(coro):
    try:
        return await coro
    except TritonCallError as e:
        raise _from_triton(e) from None


def _checked(fn):
    try:
        return fn()
    except (ValueError, ValidationError) as e:
        raise ApiError(400, str(e)) from None


def _finish(reason: str | None) -> str | None:
    return {"stop": "stop", "length": "length", None: None}.get(reason, "stop")


def _usage(calls: list[_Choice], lasts: list[Delta]) -> dict:
    prompt = {}
    for call, d in zip(calls, lasts):
        prompt.setdefault(call.prompt, d.prompt_tokens or 0)
    completion = sum(d.completion_tokens or 0 for d in lasts)
    total_prompt = sum(prompt.values())
    return {"prompt_tokens": total_prompt, "completion_tokens": completion, "total_tokens": total_prompt + completion}


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "fastserve"}


def _validation_error(errors: list[dict]) -> ApiError:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif first.get("type") == "json_invalid":
        message = "The request body is not valid JSON"
    else:
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return ApiError(400, message, param=param)
