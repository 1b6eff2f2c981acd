"""A member's expected latency as a function of its load, learned from the answers it streamed."""

from __future__ import annotations

import pytest

from python_backend.pool.latency import LatencyTracker


def _serve(tracker: LatencyTracker, load: int, per_token_s: float, ttft_s: float = 0.1, tokens: int = 33) -> None:
    """One answer that ran with `load` requests in flight, itself included."""
    for _ in range(load - 1):
        tracker.started()
    start = tracker.started()
    tracker.finished(ttft_s, ttft_s + per_token_s * (tokens - 1), tokens, load=start)
    for _ in range(load - 1):
        tracker.abandoned()


def test_a_member_that_slows_as_it_fills_is_seen_slow_before_its_queue_answers():
    cpu = LatencyTracker()
    for load in (1, 2, 3, 4) * 5:
        _serve(cpu, load, per_token_s=0.02 * load)  # sharing its cores: each answer slows with the load
    idle = cpu.expected_s(33, seats=64)
    assert idle == pytest.approx(0.1 + 0.02 * 32, rel=0.05)
    for _ in range(7):  # seven requests start; none has answered yet
        cpu.started()
    assert cpu.expected_s(33, seats=64) == pytest.approx(0.1 + 0.02 * 8 * 32, rel=0.05)


def test_a_member_that_batches_for_free_stays_as_fast_when_busy():
    gpu = LatencyTracker()
    for load in (1, 2, 3, 4) * 5:
        _serve(gpu, load, per_token_s=0.01)
    idle = gpu.expected_s(33, seats=64)
    for _ in range(7):
        gpu.started()
    assert gpu.expected_s(33, seats=64) == pytest.approx(idle, rel=0.01)
    for _ in range(121):  # 128 in flight on 64 seats: the newest waits for a round
        gpu.started()
    assert gpu.expected_s(33, seats=64) == pytest.approx(2 * idle, rel=0.02)


def test_before_any_answer_the_estimate_is_the_prior_and_recent_answers_weigh_most():
    t = LatencyTracker(ttft_s=0.05, per_token_s=0.02)
    assert t.expected_s(11, seats=4) == pytest.approx(0.05 + 0.02 * 10)
    for _ in range(30):
        _serve(t, 1, per_token_s=0.05)
    assert t.snapshot().per_token_s == pytest.approx(0.05, rel=0.02)
    assert t.snapshot().samples == 30 and t.snapshot().in_flight == 0
