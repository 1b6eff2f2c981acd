"""The pool's metrics on Triton's /metrics endpoint: per member, requests routed, feedback and its
rewards, the router's current estimate; for the pool, failovers and cache hits."""

from __future__ import annotations


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

    def _metric(self, kind: str, member: str | None = None):
        key = (kind, member or "")
        m = self._metrics.get(key)
        if m is None:
            labels = {"pool": self._pool} | ({"member": member} if member else {})
            m = self._metrics[key] = self._families[kind].Metric(labels=labels)
        return m

    def routed(self, member: str) -> None:
        self._metric("requests", member).increment(1)

    def rewarded(self, member: str, reward: float) -> None:
        self._metric("feedback", member).increment(1)
        self._metric("reward", member).increment(reward)

    def failover(self) -> None:
        self._metric("failovers").increment(1)

    def cache_hit(self) -> None:
        self._metric("cache_hits").increment(1)

    def estimates(self, values: dict[str, tuple[float, float]]) -> None:
        for member, (quality, latency_s) in values.items():
            self._metric("estimate", member).set(quality)
            self._metric("latency", member).set(latency_s)
