"""The interface every engine front offers: the in-process Engine and the EngineProcess alike.

The Triton model, the benchmarks and users' code talk to an engine only through this, so either can
serve them. Admission checks live here too: a bad request is refused with the same message whichever
front it meets, before it reaches the engine loop.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from python_backend.engine.sequence import RequestOutput, SamplingError, SamplingParams, Sequence

OutputCallback = Callable[[RequestOutput], object]


class Overloaded(RuntimeError):
    """Too many requests waiting; the client should retry later."""


class EngineUnavailable(RuntimeError):
    """No engine can take the request now (it is starting again, or has stopped)."""


@dataclass(slots=True)
class Submission:
    """One request handed to an engine."""

    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    on_output: OutputCallback | None = None
    priority: int = 0


def check_request(
    ids: list[int], params: SamplingParams, max_model_len: int, in_flight: int, max_queue_size: int
) -> None:
    """Raise SamplingError for a request that cannot be served (the message is for the client) and
    Overloaded when the queue is full."""
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
class Result:
    """A whole request's output."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_input_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def collect(self, out: RequestOutput) -> None:
        """Gather a stream of outputs (an on_output callback)."""
        self.text += out.text
        if out.finish_reason != "cancelled":
            self.token_ids += out.token_ids
        self.num_input_tokens = out.num_input_tokens
        self.num_cached_tokens = out.num_cached_tokens
        if out.finished:
            self.finish_reason = out.finish_reason
            self.error = out.error
            self.done.set()

    @classmethod
    def of(cls, seq: Sequence) -> Result:
        """A finished sequence's result, as its outputs would have gathered it."""
        r = cls(
            text=seq.detok.text[: seq.detok.sent] if seq.detok is not None else "",
            token_ids=seq.output_ids[: seq.num_sent_tokens],
            finish_reason=seq.finish_reason,
            num_input_tokens=len(seq.prompt_ids),
            num_cached_tokens=seq.num_cached_tokens,
            error=seq.error,
        )
        r.done.set()
        return r


class EngineClient(ABC):
    """add_requests, abort, snapshot and shutdown are each front's own; the rest is built on them."""

    tokenizer: object
    max_model_len: int
    _request_ids = itertools.count()

    @abstractmethod
    def add_requests(self, items: list[Submission]) -> list[Exception | None]:
        """Check and queue these requests; returns at once, with None or the error that refused each
        (the others still run)."""

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Stop a request at the next iteration; its callback gets a final 'cancelled' output."""

    @abstractmethod
    def snapshot(self) -> dict:
        """The scheduler's and the KV cache's state as plain numbers, for metrics."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop; requests still in flight end as 'cancelled'."""

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        on_output: OutputCallback | None = None,
        priority: int = 0,
    ) -> None:
        """Check and queue one request. Raises SamplingError for a request that cannot be served (the
        message is for the client), Overloaded when the queue is full, EngineUnavailable when no
        engine runs."""
        error = self.add_requests([Submission(request_id, prompt, params, on_output, priority)])[0]
        if error is not None:
            raise error

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams]) -> list[Result]:
        """Run these prompts to completion; results in order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        results = [Result() for _ in prompts]
        base = f"gen-{next(self._request_ids)}-"
        items = [Submission(base + str(i), p, sp, results[i].collect) for i, (p, sp) in enumerate(zip(prompts, plist))]
        for error in self.add_requests(items):
            if error is not None:
                for item in items:
                    self.abort(item.request_id)
                raise error
        for r in results:
            r.done.wait()
        return results

    async def stream(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Outputs as they are made, for asyncio callers. Cancelling the iteration aborts the request."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.add_request(request_id, prompt, params, lambda o: loop.call_soon_threadsafe(q.put_nowait, o), priority)
        finished = False
        try:
            while True:
                out = await q.get()
                yield out
                if out.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)
