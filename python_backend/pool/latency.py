"""Live latency per member: time to first token, time per output token and requests in flight,
as exponentially weighted means, so a member that slows down or queues up loses traffic."""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class LatencySnapshot:
    ttft_s: float
    per_token_s: float
    in_flight: int
    samples: int


class LatencyTracker:
    """Thread-safe: the router reads it while response threads record."""

    def __init__(self, ttft_s: float = 0.05, per_token_s: float = 0.02, smoothing: float = 0.2):
        self._lock = threading.Lock()
        self.ttft_s = ttft_s
        self.per_token_s = per_token_s
        self.smoothing = smoothing
        self.in_flight = 0
        self.samples = 0

    def started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def finished(self, ttft_s: float | None, total_s: float, tokens: int, streamed: bool = True) -> None:
        """One request done: its time to first token and, past it, the time per token. An answer
        sent whole shows no first token of its own: it updates the time per token only, past the
        current time-to-first-token estimate."""
        with self._lock:
            self.in_flight = max(0, self.in_flight - 1)
            if ttft_s is None:
                return
            a = self.smoothing if self.samples else 1.0
            if streamed:
                self.ttft_s += a * (ttft_s - self.ttft_s)
            if tokens > 1:
                first = ttft_s if streamed else min(self.ttft_s, total_s)
                self.per_token_s += a * ((total_s - first) / (tokens - 1) - self.per_token_s)
            self.samples += 1

    def abandoned(self) -> None:
        with self._lock:
            self.in_flight = max(0, self.in_flight - 1)

    def expected_s(self, max_tokens: int, seats: int) -> float:
        """Expected seconds for a request of `max_tokens` output tokens, counting the requests ahead
        of it beyond the member's `seats` as waiting for one of them."""
        with self._lock:
            one = self.ttft_s + self.per_token_s * max(0, max_tokens - 1)
            queued = max(0, self.in_flight + 1 - seats)
            return one * (1.0 + queued / max(1, seats))

    def snapshot(self) -> LatencySnapshot:
        with self._lock:
            return LatencySnapshot(self.ttft_s, self.per_token_s, self.in_flight, self.samples)
