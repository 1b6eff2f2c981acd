"""FastServe's metrics on Triton's /metrics endpoint, through the Python backend's MetricFamily."""

from __future__ import annotations

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]


class Metrics:
    def __init__(self, pb_utils, model_name: str, version: str):
        labels = {"model": model_name, "version": version}
        mf = pb_utils.MetricFamily
        self._families: list = []  # a family must outlive its metrics, or setting them fails

        def family(name, description, kind):
            fam = mf(name=name, description=description, kind=kind)
            self._families.append(fam)
            return fam

        def histogram(name, description):
            return family(name, description, mf.HISTOGRAM).Metric(labels=labels, buckets=LATENCY_BUCKETS)

        self.ttft = histogram("fastserve_time_to_first_token_seconds", "Time from arrival to the first new token")
        self.itl = histogram(
            "fastserve_inter_token_latency_seconds",
            "Mean time between consecutive new tokens of a request, observed once per request",
        )
        self.e2e = histogram("fastserve_request_latency_seconds", "Time from arrival to the last token")
        self.responses = family(
            "fastserve_responses_total", "Responses sent (streamed deltas and final answers)", mf.COUNTER
        ).Metric(labels=labels)
        self.prompt_tokens = family("fastserve_prompt_tokens_total", "Prompt tokens received", mf.COUNTER).Metric(
            labels=labels
        )
        self.generation_tokens = family("fastserve_generation_tokens_total", "Tokens generated", mf.COUNTER).Metric(
            labels=labels
        )
        self.prefix_hit_tokens = family(
            "fastserve_prefix_cache_hit_tokens_total", "Prompt tokens served from the prefix cache", mf.COUNTER
        ).Metric(labels=labels)
        self.preemptions = family("fastserve_preemptions_total", "Sequences preempted", mf.COUNTER).Metric(
            labels=labels
        )
        gauge = family("fastserve_requests", "Requests in the engine by state", mf.GAUGE)
        self.waiting = gauge.Metric(labels={**labels, "state": "waiting"})
        self.running = gauge.Metric(labels={**labels, "state": "running"})
        blocks = family("fastserve_kv_blocks", "KV-cache blocks", mf.GAUGE)
        self.kv_used = blocks.Metric(labels={**labels, "state": "used"})
        self.kv_total = blocks.Metric(labels={**labels, "state": "total"})
        self._queue_family = family(
            "fastserve_scheduler_queue_length",
            "Unfinished requests per scheduler queue (MLFQ level; FCFS has one)",
            mf.GAUGE,
        )
        self._queues: list = []
        self.swapped = family(
            "fastserve_swapped_requests", "Requests whose KV cache is in host memory", mf.GAUGE
        ).Metric(labels=labels)
        host = family("fastserve_host_kv_blocks", "Host-memory KV blocks (swap space)", mf.GAUGE)
        self.host_used = host.Metric(labels={**labels, "state": "used"})
        self.host_total = host.Metric(labels={**labels, "state": "total"})
        swaps = family("fastserve_kv_swaps_total", "Sequences whose KV cache moved between device and host", mf.COUNTER)
        self.swap_outs = swaps.Metric(labels={**labels, "direction": "out"})
        self.swap_ins = swaps.Metric(labels={**labels, "direction": "in"})
        self.recomputes = family(
            "fastserve_recomputes_total", "Preempted sequences whose KV cache was dropped, to be recomputed", mf.COUNTER
        ).Metric(labels=labels)
        self.engine_restarts = family(
            "fastserve_engine_restarts_total", "New engine processes started after one died", mf.COUNTER
        ).Metric(labels=labels)
        self.engine_up = family(
            "fastserve_engine_up", "1 while an engine takes requests, 0 while it is down or restarting", mf.GAUGE
        ).Metric(labels=labels)
        self._last: dict[str, int] = {}
        self._gauges: dict[int, float] = {}  # the last value set, per gauge
        finish = family("fastserve_request_finish_total", "Finished requests by reason", mf.COUNTER)
        self._finish_family = finish
        self._labels = labels
        self._finish: dict[str, object] = {}

    def finished(self, reason: str, n: int = 1) -> None:
        metric = self._finish.get(reason)
        if metric is None:
            metric = self._finish[reason] = self._finish_family.Metric(labels={**self._labels, "reason": reason})
        metric.increment(n)

    def set_engine_up(self, up: bool) -> None:
        self._set(self.engine_up, 1 if up else 0)

    def engine_state(self, state: dict) -> None:
        """Gauges and the counters the engine keeps itself, from Engine.snapshot(). Only changed values
        are set: each metric call is a round trip to the server."""
        self._set(self.waiting, state["waiting"])
        self._set(self.running, state["running"])
        self._set(self.kv_used, state["kv_used"])
        self._set(self.kv_total, state["kv_total"])
        for level, n in enumerate(state["queue_lengths"]):
            while len(self._queues) <= level:
                self._queues.append(self._queue_family.Metric(labels={**self._labels, "level": str(len(self._queues))}))
            self._set(self._queues[level], n)
        self._set(self.swapped, state["swapped"])
        self._set(self.host_used, state["host_blocks_used"])
        self._set(self.host_total, state["host_blocks_total"])
        for key, counter in (
            ("preemptions", self.preemptions),
            ("swap_outs", self.swap_outs),
            ("swap_ins", self.swap_ins),
            ("recomputes", self.recomputes),
            ("prefix_hit_tokens", self.prefix_hit_tokens),
        ):
            if state[key] > self._last.get(key, 0):
                counter.increment(state[key] - self._last.get(key, 0))
                self._last[key] = state[key]

    def _set(self, gauge, value) -> None:
        if self._gauges.get(id(gauge)) != value:
            gauge.set(value)
            self._gauges[id(gauge)] = value
