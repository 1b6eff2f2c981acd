"""What flows through the engine: sampling settings, a request, the sequence the engine tracks for it,
and the outputs it hands back. Plain data classes; the logic lives in the modules that use them."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class SamplingError(ValueError):
    """A request asked for something that cannot be done; the message is for the client."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self) -> None:
        """Reject values that make no sense, with a message a person understands."""
        checks = [
            (
                isinstance(self.max_tokens, int) and self.max_tokens >= 1,
                f"max_tokens must be at least 1, got {self.max_tokens}",
            ),
            (self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 turns it off), got {self.top_k}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (self.repetition_penalty > 0.0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (
                -2.0 <= self.frequency_penalty <= 2.0,
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
            (self.seed is None or 0 <= self.seed < 2**64, f"seed must be in [0, 2^64), got {self.seed}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise SamplingError(message)
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value != value or value in (float("inf"), float("-inf")):
                raise SamplingError(f"{name} must be a finite number, got {value}")


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


@dataclass(slots=True)
class RequestOutput:
    """One update for a client: new text, and at the end the reason and counts."""

    request_id: str
    text: str  # new text since the previous output
    token_ids: list[int]  # new token ids since the previous output
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "cancelled" | "error"
    num_input_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0
    logprobs: list[float] | None = None
    error: str | None = None
    unavailable: bool = False  # the error is that no engine could serve it: sending it again can succeed


@dataclass
class Timing:
    arrival: float = field(default_factory=time.perf_counter)
    first_scheduled: float | None = None
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    finished: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def itls(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


@dataclass(eq=False)
class Sequence:
    """The engine's record of one request: tokens, KV blocks, progress, and what it has emitted."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    on_output: Callable[[RequestOutput], Any] | None = None
    priority: int = 0
    arrival_index: int = 0
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_hashes: list[int] = field(default_factory=list)  # chain hashes of the leading full blocks
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    finish_reason: str | None = None
    error: str | None = None  # why it ended with finish_reason "error"
    num_sent_tokens: int = 0  # output tokens handed to the client so far
    done: bool = False  # its final output has been made
    timing: Timing = field(default_factory=Timing)
    detok: Any = None  # the incremental detokenizer state (detokenize.py)
    generator: Any = None  # a torch.Generator when the request is seeded
    logprobs: list[float] = field(default_factory=list)
    num_preemptions: int = 0
    # MLFQ bookkeeping (mlfq.py); unused by FCFS
    queue_level: int = 0
    quantum_used: float = 0.0  # seconds of service in the current queue
    home_level: int = 0  # the queue a starved job was promoted from, which it returns to after one quantum
    last_run: float = 0.0
    joined_at: float = 0.0  # the scheduler's clock when the job arrived
    senior: bool = False  # in the system longer than the senior bound: runs ahead of the queues
    swap_buffer: Any = None  # the K/V in host memory while SWAPPED (kv_swap.py)
    swapped_blocks: int = 0
    runner_kv: Any = None  # the KV cache of a runner that keeps one per sequence (graph_runner.py)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_at(self, pos: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[pos] if pos < n else self.output_ids[pos - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def in_prefill(self) -> bool:
        """More than one token to compute: the prompt, or everything again after a preemption."""
        return self.num_uncomputed > 1

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
