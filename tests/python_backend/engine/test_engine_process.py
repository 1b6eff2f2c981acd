"""The engine in its own process: the same outputs as in this one, refusals at once, and no request
left hanging when the process ends (asked to, or killed)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from python_backend.engine.client import EngineUnavailable, Submission
from python_backend.engine.engine import Engine, EngineConfig, Result
from python_backend.engine.engine_process import EngineProcess, EngineProcessError
from python_backend.engine.sequence import SamplingError, SamplingParams
from tests.conftest import build_entry, save_tiny_model

PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "1, 2, 3, 4,", "Hello"]
CONFIG = dict(num_kv_blocks=256, max_num_seqs=4, max_queue_size=8)


@pytest.fixture(scope="module")
def tiny_engine_dir(tmp_path_factory, smollm2_source):
    tmp = tmp_path_factory.mktemp("tiny-proc")
    folder = save_tiny_model(tmp / "src", "llama", smollm2_source[1], seed=7)
    return build_entry(tmp / "repo", str(folder), "tiny") / "1" / "engine"


@pytest.fixture(scope="module")
def proc(tiny_engine_dir):
    engine = EngineProcess(tiny_engine_dir, EngineConfig(**CONFIG))
    yield engine
    engine.shutdown()


def _submit(engine, prompts: list[str], params: SamplingParams, prefix: str) -> list[Result]:
    results = [Result() for _ in prompts]
    for i, p in enumerate(prompts):
        engine.add_request(f"{prefix}{i}", p, params, results[i].collect)
    for r in results:
        assert r.done.wait(120), "no final output within 120 s"
    return results


def test_same_greedy_output_as_in_process(proc, tiny_engine_dir):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    local = Engine(tiny_engine_dir, EngineConfig(**CONFIG)).generate(PROMPTS, params)
    remote = _submit(proc, PROMPTS, params, "same-")
    for a, b in zip(local, remote):
        assert b.finish_reason == "length" and len(b.token_ids) == 24
        assert b.token_ids == a.token_ids
        assert b.text == a.text
    assert proc.in_flight == 0


def test_bad_requests_are_refused_at_once_with_the_engines_messages(proc):
    with pytest.raises(SamplingError, match="prompt is empty"):
        proc.add_request("bad-empty", "", SamplingParams())
    with pytest.raises(SamplingError, match="temperature must be >= 0"):
        proc.add_request("bad-temp", "hi", SamplingParams(temperature=-1.0))
    with pytest.raises(SamplingError, match="this model's context is"):
        proc.add_request("bad-long", list(range(1, proc.max_model_len + 5)), SamplingParams())
    assert proc.in_flight == 0
    ok = _submit(proc, ["still serving"], SamplingParams(max_tokens=4, temperature=0.0), "after-bad-")
    assert ok[0].finish_reason == "length"


def test_a_full_queue_is_overloaded_and_the_queue_drains(proc):
    from python_backend.engine.engine import Overloaded

    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    results = [Result() for _ in range(CONFIG["max_queue_size"])]
    for i, r in enumerate(results):
        proc.add_request(f"full-{i}", "count with me", params, r.collect)
    with pytest.raises(Overloaded):
        proc.add_request("full-extra", "one more", params)
    for i in range(len(results)):
        proc.abort(f"full-{i}")
    for r in results:
        assert r.done.wait(60) and r.finish_reason == "cancelled"
    assert proc.in_flight == 0


def test_state_reaches_the_parent(proc):
    """The gauges follow the child within a tick: after the requests above, nothing runs or holds blocks."""
    import time

    deadline = time.monotonic() + 5
    while proc.snapshot()["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    state = proc.snapshot()
    assert state["kv_total"] == CONFIG["num_kv_blocks"] and state["running"] == 0 and state["waiting"] == 0
    assert {"waiting", "kv_used", "queue_lengths", "preemptions", "prefix_hit_tokens"} <= set(state)


def test_killed_engine_fails_requests_in_flight_refuses_new_ones_then_comes_back(tiny_engine_dir):
    engine = EngineProcess(tiny_engine_dir, EngineConfig(**CONFIG))
    first = threading.Event()
    result = Result()

    def collect(out):
        result.collect(out)
        first.set()

    engine.add_request("k0", "a long story", SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True), collect)
    assert first.wait(60)
    os.kill(engine.pid, signal.SIGKILL)
    assert result.done.wait(30), "the request in flight was left hanging"
    assert result.finish_reason == "error" and "engine process exited" in result.error
    with pytest.raises(EngineUnavailable, match="exited"):
        engine.add_request("k1", "anyone there?", SamplingParams())
    deadline = time.monotonic() + 120
    while not engine.up and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engine.up and engine.restarts == 1
    again = _submit(engine, ["anyone there?"], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), "k2-")
    assert again[0].finish_reason == "length" and len(again[0].token_ids) == 4
    engine.shutdown()
    assert not engine._proc.is_alive()


def test_shutdown_cancels_requests_in_flight_and_ends_the_process(tiny_engine_dir):
    engine = EngineProcess(tiny_engine_dir, EngineConfig(**CONFIG))
    result = Result()
    engine.add_request("s0", "go on", SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True), result.collect)
    engine.shutdown()
    assert result.done.is_set() and result.finish_reason == "cancelled"
    assert not engine._proc.is_alive()


def test_an_engine_that_cannot_start_is_named(tiny_engine_dir):
    with pytest.raises(EngineProcessError, match="scheduler='bogus'"):
        EngineProcess(tiny_engine_dir, EngineConfig(num_kv_blocks=64, scheduler="bogus"))


def test_a_batch_of_requests_refuses_only_its_bad_ones(proc, tiny_engine_dir):
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    results = [Result() for _ in range(4)]
    items = [
        Submission("batch-0", PROMPTS[0], params, results[0].collect, 0),
        Submission("batch-1", "", params, results[1].collect, 0),
        Submission("batch-2", PROMPTS[2], SamplingParams(top_p=0.0), results[2].collect, 0),
        Submission("batch-3", [5, 6, 7], params, results[3].collect, 1),
    ]
    errors = proc.add_requests(items)
    assert errors[0] is None and errors[3] is None
    assert isinstance(errors[1], SamplingError) and "empty" in str(errors[1])
    assert isinstance(errors[2], SamplingError) and "top_p" in str(errors[2])
    for i in (0, 3):
        assert results[i].done.wait(60) and len(results[i].token_ids) == 6
    local = Engine(tiny_engine_dir, EngineConfig(**CONFIG)).generate([PROMPTS[0], [5, 6, 7]], params)
    assert [results[0].token_ids, results[3].token_ids] == [r.token_ids for r in local]
    assert proc.in_flight == 0


def test_submitting_never_waits_on_an_engine_whose_outputs_back_up(tiny_engine_dir):
    """A slow consumer fills the output pipe and the child blocks sending; a large batch submitted
    then must not block the caller (were it to hold the lock the reader needs, both processes would stop)."""
    engine = EngineProcess(tiny_engine_dir, EngineConfig(num_kv_blocks=512, max_num_seqs=4, max_queue_size=128))
    try:

        def slow(out):
            time.sleep(0.02)

        long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        for i in range(4):
            engine.add_request(f"slow-{i}", f"story {i}", long, slow)
        time.sleep(3)  # the engine outruns the consumer: the pipe to the parent fills
        big = [Submission(f"big-{i}", list(range(1, 480)), SamplingParams(max_tokens=1)) for i in range(100)]
        answers: list = []
        submit = threading.Thread(target=lambda: answers.append(engine.add_requests(big)), daemon=True)
        submit.start()
        submit.join(timeout=2.0)
        assert not submit.is_alive(), "add_requests blocked behind the engine's backed-up outputs"
        assert answers == [[None] * 100]
        for i in range(4):
            engine.abort(f"slow-{i}")
    finally:
        engine.shutdown(timeout_s=120)
    assert not engine._proc.is_alive()


def test_shutdown_while_a_new_engine_starts_leaves_no_process(tiny_engine_dir):
    import multiprocessing

    def engines() -> set[int]:
        return {p.pid for p in multiprocessing.active_children() if p.name == "fastserve-engine"}

    engine = EngineProcess(tiny_engine_dir, EngineConfig(**CONFIG))
    others = engines() - {engine.pid}  # other tests' engines
    os.kill(engine.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while engine.up and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.up
    time.sleep(1.5)  # past the first pause: a new engine process is starting
    started = time.monotonic()
    engine.shutdown(timeout_s=30)
    assert time.monotonic() - started < 10, "shutdown waited for the new engine to finish starting"
    assert engines() <= others, "an engine process outlived shutdown"
    assert not engine.up and engine.restarts == 0
