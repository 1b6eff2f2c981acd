"""What crosses the pipe between the engine process and the server: one named class per message."""

from __future__ import annotations

from dataclasses import dataclass, fields

from python_backend.engine.sequence import RequestOutput, SamplingParams

_PACKED = (
    "request_id",
    "text",
    "token_ids",
    "finished",
    "finish_reason",
    "num_input_tokens",
    "num_output_tokens",
    "num_cached_tokens",
    "logprobs",
    "error",
    "unavailable",
)
assert tuple(f.name for f in fields(RequestOutput)) == _PACKED, "Outputs.pack must follow RequestOutput"


# ---- server → engine process -------------------------------------------------------------------
@dataclass(slots=True)
class NewRequest:
    """A request already tokenized and checked by the server."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    priority: int = 0


@dataclass(slots=True)
class AddRequests:
    requests: list[NewRequest]


@dataclass(slots=True)
class Abort:
    request_id: str


@dataclass(slots=True)
class Stop:
    """Cancel what is in flight, answer Stopped, exit."""


# ---- engine process → server -------------------------------------------------------------------
@dataclass(slots=True)
class Ready:
    max_model_len: int
    state: dict


@dataclass(slots=True)
class StartFailed:
    message: str


@dataclass(slots=True)
class Outputs:
    """One or more steps' outputs, and now and then the scheduler's state for the metrics.

    The outputs travel as rows of their fields: hundreds a step cross the pipe, and a tuple pickles
    several times faster than a dataclass instance. `pack` and `unpack` are the only places that
    know the order."""

    rows: list[tuple]
    state: dict | None = None

    @staticmethod
    def pack(o: RequestOutput) -> tuple:
        return (
            o.request_id,
            o.text,
            o.token_ids,
            o.finished,
            o.finish_reason,
            o.num_input_tokens,
            o.num_output_tokens,
            o.num_cached_tokens,
            o.logprobs,
            o.error,
            o.unavailable,
        )

    def unpack(self) -> list[RequestOutput]:
        return [RequestOutput(*row) for row in self.rows]


@dataclass(slots=True)
class Stopped:
    pass
