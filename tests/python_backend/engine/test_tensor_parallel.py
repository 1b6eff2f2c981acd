"""Tensor parallelism over two CPU processes (gloo): the same greedy output as one process, through
the real tritonserver, and no worker left behind."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from clients.client import Client
from python_backend.engine.engine import Engine
from python_backend.engine.sequence import SamplingParams
from python_backend.models.sharding import ShardingError
from tests.conftest import prompt_ids


def _workers() -> list[str]:
    out = subprocess.run(["pgrep", "-af", "python_backend.engine.tensor_parallel"], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if "pgrep" not in line]


def test_tensor_parallel_entry_serves_what_one_process_serves(smollm2_server, smollm2_engine_dir, prompt_set):
    """float32 SmolLM2 split over two ranks (3 KV heads: 2 and 1), through tritonserver, against the
    single-process engine on the project's prompts: the same greedy text."""
    config = (smollm2_server.repository / "smollm2_tp2" / "config.pbtxt").read_text()
    assert 'key: "tensor_parallel" value: { string_value: "2" }' in config
    assert len(_workers()) >= 1  # the entry's second rank runs beside the server
    single = Engine.from_folder(smollm2_engine_dir, num_kv_blocks=512)
    n = 24
    ids = [prompt_ids(single.tokenizer, p) for p in prompt_set]
    expected = single.generate(ids, SamplingParams(max_tokens=n, temperature=0.0))
    client = Client(smollm2_server.grpc_url, "grpc", "smollm2_tp2")

    def one(p):
        if p["kind"] == "chat":
            return client.chat([{"role": "user", "content": p["text"]}], max_tokens=n, temperature=0.0).text
        return client.generate(p["text"], n, temperature=0.0).text

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(one, prompt_set))
    for p, text, ref in zip(prompt_set, got, expected):
        assert text == ref.text, p["id"]


def test_engine_refuses_more_ranks_than_kv_heads_before_starting_any(smollm2_engine_dir):
    before = _workers()
    with pytest.raises(ShardingError, match="at least as many KV heads"):
        Engine.from_folder(smollm2_engine_dir, tensor_parallel=4)
    assert _workers() == before


def test_shutdown_stops_the_worker_ranks(smollm2_engine_dir):
    before = len(_workers())
    engine = Engine.from_folder(smollm2_engine_dir, tensor_parallel=2, num_kv_blocks=64)
    assert len(_workers()) == before + 1
    [result] = engine.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=4, temperature=0.0))
    assert len(result.token_ids) == 4
    engine.shutdown()
    assert len(_workers()) == before


def test_a_dead_rank_brings_the_entry_back_by_itself(smollm2_server):
    """Kill the served entry's second rank: the engine process sees the group is broken, exits and is
    started again with new workers, and the entry answers again."""
    import os
    import signal
    import time

    entry = str(smollm2_server.repository / "smollm2_tp2")
    [victim] = [int(line.split()[0]) for line in _workers() if entry in line]
    os.kill(victim, signal.SIGKILL)
    client = Client(smollm2_server.grpc_url, "grpc", "smollm2_tp2")
    deadline, answer = time.monotonic() + 180, None
    while time.monotonic() < deadline:
        try:
            answer = client.generate("The capital of France is", 8, temperature=0.0)
            if answer.finish_reason in ("stop", "length") and answer.text:
                break
        except Exception:  # refused while the engine restarts
            pass
        time.sleep(2)
    assert answer is not None and answer.text, "the entry did not come back"
    workers = [int(line.split()[0]) for line in _workers() if entry in line]
    assert workers and victim not in workers
