"""Live latency per member: time to first token and time per output token as functions of the
member's load (requests in flight), each a line fitted by exponentially weighted least squares
over the answers it streamed. A member whose answers slow down as it fills up (a CPU engine
sharing its cores) is then seen to be slow *before* its queue's answers come back, and loses
traffic while the queue builds; one that batches for free (a GPU engine) shows a flat line."""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class LatencySnapshot:
    ttft_s: float
    per_token_s: float
    in_flight: int
    samples: int


class _Line:
    """y ≈ a + b·x by exponentially weighted least squares over the observations, b ≥ 0. A prior of
    `prior_weight` observations of y₀ (a flat line, fading as observations arrive) holds the level
    until answers come; the slope comes from the observations alone."""

    def __init__(self, y0: float, forget: float = 0.9, prior_weight: float = 1.0):
        self.forget, self.y0, self.prior = forget, y0, prior_weight
        self.w = self.x = self.y = self.xx = self.xy = 0.0

    def add(self, x: float, y: float) -> None:
        f = self.forget
        self.prior *= f
        self.w, self.x, self.y = f * self.w + 1, f * self.x + x, f * self.y + y
        self.xx, self.xy = f * self.xx + x * x, f * self.xy + x * y

    def at(self, x: float) -> float:
        level = (self.prior * self.y0 + self.y) / (self.prior + self.w)
        if self.w == 0:
            return level
        mx = self.x / self.w
        var = self.xx / self.w - mx * mx
        slope = max(0.0, (self.xy / self.w - mx * self.y / self.w) / var) if var > 1e-9 else 0.0
        return max(0.0, level + slope * (x - mx))


class LatencyTracker:
    """Thread-safe: the router reads it while response threads record."""

    def __init__(self, ttft_s: float = 0.05, per_token_s: float = 0.02, forget: float = 0.9):
        self._lock = threading.Lock()
        self._ttft = _Line(ttft_s, forget)
        self._per_token = _Line(per_token_s, forget)
        self.in_flight = 0
        self.samples = 0

    def started(self) -> int:
        """A request begins; returns the load it starts under (itself included), for finished()."""
        with self._lock:
            self.in_flight += 1
            return self.in_flight

    def finished(
        self, ttft_s: float | None, total_s: float, tokens: int, streamed: bool = True, load: int | None = None
    ) -> None:
        """One request done: its time to first token and, past it, the time per token, at the load
        it ran under (the mean of the loads at its start and its end). An answer sent whole shows
        no first token of its own: it updates the time per token only."""
        with self._lock:
            end_load = self.in_flight
            self.in_flight = max(0, self.in_flight - 1)
            if ttft_s is None:
                return
            x = (end_load + (load if load is not None else end_load)) / 2.0
            if streamed:
                self._ttft.add(x, ttft_s)
            if tokens > 1:
                first = ttft_s if streamed else min(self._ttft.at(x), total_s)
                self._per_token.add(x, (total_s - first) / (tokens - 1))
            self.samples += 1

    def abandoned(self) -> None:
        with self._lock:
            self.in_flight = max(0, self.in_flight - 1)

    def expected_s(self, max_tokens: int, seats: int) -> float:
        """Expected seconds for a request of `max_tokens` output tokens sent now: both lines read at
        the load it would join, and the requests beyond the member's `seats` as waiting for one."""
        with self._lock:
            load = self.in_flight + 1
            one = self._ttft.at(load) + self._per_token.at(load) * max(0, max_tokens - 1)
            queued = max(0, load - seats)
            return one * (1.0 + queued / max(1, seats))

    def snapshot(self) -> LatencySnapshot:
        with self._lock:
            load = self.in_flight + 1
            return LatencySnapshot(self._ttft.at(load), self._per_token.at(load), self.in_flight, self.samples)
