"""The pool's metrics on Triton's /metrics endpoint: per member, requests routed, feedback and its
rewards, the router's current estimate; for the pool, failovers and cache hits.

Any thread may record; only the pool's sending thread calls flush(), which talks to the server:
metric calls from worker threads while that thread sends crash the Python backend of tritonserver
2.51 (SIGSEGV or an uncaught lock_exception in libtriton_python.so)."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("fastserve.pool")


class PoolMetrics:
    def __init__(self, pb_utils, pool: str):
        mf = pb_utils.MetricFamily
        self._pool = pool
        self._families = {
            "requests": mf("fastserve_pool_requests_total", "Requests the pool routed to a member", mf.COUNTER),
            "feedback": mf("fastserve_pool_feedback_total", "Feedback received per member", mf.COUNTER),
            "reward": mf("fastserve_pool_reward_total", "Sum of the rewards received per member", mf.COUNTER),
            "estimate": mf(
                "fastserve_pool_expected_reward", "The router's expected reward for a plain prompt", mf.GAUGE
            ),
            "latency": mf(
                "fastserve_pool_expected_latency_seconds", "Expected seconds for a 16-token answer", mf.GAUGE
            ),
            "failovers": mf("fastserve_pool_failovers_total", "Requests moved to the next member", mf.COUNTER),
            "cache_hits": mf("fastserve_pool_cache_hits_total", "Answers served from the response cache", mf.COUNTER),
        }
        self._metrics: dict[tuple[str, str], object] = {}
        self._lock = threading.Lock()
        # counter increments not yet flushed; every counter starts at 0 in the output, so a
        # dashboard shows "none yet" rather than "no data"
        self._added: dict[tuple[str, str], float] = {("failovers", ""): 0.0, ("cache_hits", ""): 0.0}
        self._set: dict[tuple[str, str], float] = {}  # gauge values not yet flushed
        self._known: set[str] = set()  # members whose counters exist

    def _metric(self, kind: str, member: str | None = None):
        key = (kind, member or "")
        m = self._metrics.get(key)
        if m is None:
            labels = {"pool": self._pool} | ({"member": member} if member else {})
            m = self._metrics[key] = self._families[kind].Metric(labels=labels)
        return m

    def _add(self, kind: str, member: str | None, value: float) -> None:
        key = (kind, member or "")
        with self._lock:
            self._added[key] = self._added.get(key, 0.0) + value

    def routed(self, member: str) -> None:
        self._add("requests", member, 1)

    def rewarded(self, member: str, reward: float) -> None:
        self._add("feedback", member, 1)
        self._add("reward", member, reward)

    def failover(self) -> None:
        self._add("failovers", None, 1)

    def cache_hit(self) -> None:
        self._add("cache_hits", None, 1)

    def estimates(self, values: dict[str, tuple[float, float]]) -> None:
        with self._lock:
            for member in set(values) - self._known:
                self._known.add(member)
                for kind in ("requests", "feedback", "reward"):
                    self._added[(kind, member)] = self._added.get((kind, member), 0.0)
            for member, (quality, latency_s) in values.items():
                self._set[("estimate", member)] = quality
                self._set[("latency", member)] = latency_s

    def flush(self) -> None:
        """Hand what was recorded to the server; the sending thread's call only."""
        with self._lock:
            if not self._added and not self._set:
                return
            added, self._added = self._added, {}
            gauges, self._set = self._set, {}
        for (kind, member), value in added.items():
            try:
                self._metric(kind, member).increment(value)
            except Exception:  # a metric the server refused: the others still go out
                log.exception("pool metric %s for %s", kind, member or "the pool")
        for (kind, member), value in gauges.items():
            try:
                self._metric(kind, member).set(value)
            except Exception:
                log.exception("pool metric %s for %s", kind, member or "the pool")
