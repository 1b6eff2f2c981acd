"""The pool entry through a real tritonserver: three tiny members behind one model. Routing,
pinning, streaming, bad input, feedback, the response cache, failover when members are unloaded
and reloaded, live reconfiguration from pool.json, and learned state across a restart."""

from __future__ import annotations

import json
import time

import pytest

from clients.client import Client
from tests.conftest import build_entry, save_tiny_model, start_server
from tests.python_backend.test_model import _http_generate, _stream_request, metric

MEMBERS = ("m_a", "m_b", "m_c")


@pytest.fixture(scope="module")
def pool_repo(tmp_path_factory, smollm2_source):
    from builders.pool import build_pool

    tmp = tmp_path_factory.mktemp("pool")
    repo = tmp / "repo"
    for i, name in enumerate(MEMBERS):
        folder = save_tiny_model(tmp / f"src-{name}", "llama", smollm2_source[1], seed=10 + i)
        build_entry(repo, str(folder), name, "--max-num-seqs", "2")
    settings = {
        "members": [
            {"name": "m_a", "quality": 0.9, "seats": 2},
            {"name": "m_b", "quality": 0.4, "seats": 2},
            {"name": "m_c", "quality": 0.3, "seats": 2},
        ],
        "quality_weight": 1.0,
        "exploration": 0.0,
        "cache_size": 8,
    }
    build_pool(repo, "pool", settings)
    return repo


@pytest.fixture(scope="module")
def pool_server(pool_repo):
    server = start_server(pool_repo)
    yield server
    server.stop()


def _generate(server, body: dict, model: str = "pool") -> tuple[int, dict]:
    return _http_generate(server, body, model)


def test_pool_routes_to_its_best_member_and_says_which(pool_server):
    status, body = _generate(pool_server, {"text_input": "Hello there", "max_tokens": 4, "temperature": 0.5})
    assert status == 200, body
    assert body["served_by"] == "m_a" and len(body["request_id"]) >= 16
    assert body["finish_reason"] in ("length", "stop")


def test_pinning_serves_exactly_that_member(pool_server):
    prompt = {"text_input": "Count: one two", "max_tokens": 6, "temperature": 0.0, "exclude_input_in_output": True}
    status, pinned = _generate(pool_server, {**prompt, "model": "m_c"})
    assert status == 200 and pinned["served_by"] == "m_c"
    _, direct = _generate(pool_server, prompt, model="m_c")
    assert pinned["text_output"] == direct["text_output"]
    status, body = _generate(pool_server, {**prompt, "model": "nobody"})
    assert status == 400 and "not a member of pool pool" in body["error"]


def test_streaming_through_the_pool(pool_server):
    deltas = list(
        Client(pool_server.grpc_url, "grpc", "pool").stream("Once upon a time", max_tokens=6, ignore_eos=True)
    )
    assert len(deltas) >= 2


def test_many_streams_at_once_through_the_pool(pool_server):
    """Sixteen streams at once, routed and pinned: every one answers and the server stays up."""
    from concurrent.futures import ThreadPoolExecutor

    client = Client(pool_server.grpc_url, "grpc", "pool")

    def one(i: int) -> str:
        pin = {"model": MEMBERS[i % 3]} if i % 2 else {}
        return "".join(client.stream(f"Story {i}:", max_tokens=8, ignore_eos=True, temperature=0.5, **pin))

    with ThreadPoolExecutor(16) as workers:
        answers = list(workers.map(one, range(16)))
    assert all(answers)
    assert _generate(pool_server, {"text_input": "Still here", "max_tokens": 2})[0] == 200


def test_a_cancelled_stream_is_cancelled_at_the_member(pool_server):
    def cancelled() -> float:
        return sum(metric(pool_server, "fastserve_request_finish_total", model=m, reason="cancelled") for m in MEMBERS)

    before = cancelled()
    texts, _, error = _stream_request(
        pool_server.grpc_url, "pool", "Count slowly to a thousand:", 200, settings={"ignore_eos": True}, cancel_after=2
    )
    assert error is None and len(texts) >= 2
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and cancelled() < before + 1:
        time.sleep(0.5)
    assert cancelled() == before + 1
    assert _generate(pool_server, {"text_input": "Still here", "max_tokens": 2})[0] == 200


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_client_pins_reads_who_served_and_rates_the_answer(pool_server, protocol):
    from clients.client import GenerateError

    url = pool_server.grpc_url if protocol == "grpc" else pool_server.http_url
    client = Client(url, protocol, "pool")
    answer = client.generate("Count: one two", max_tokens=4, temperature=0.5, model="m_b", quality_weight=0.2)
    assert answer.served_by == "m_b" and answer.request_id and answer.text
    before = metric(pool_server, "fastserve_pool_feedback_total", member="m_b")
    assert client.feedback(answer.request_id, 0.25) == "m_b"
    assert metric(pool_server, "fastserve_pool_feedback_total", member="m_b") == before + 1
    with pytest.raises(GenerateError, match="unknown"):
        client.feedback(answer.request_id, 0.25)  # rated once
    with pytest.raises(GenerateError, match="quality_weight"):
        client.generate("Hi", max_tokens=2, quality_weight=3.0)


def test_bad_input_is_refused_with_the_members_message(pool_server):
    bad = {"text_input": "Hello", "max_tokens": 8, "top_p": 1.5}
    _, member = _generate(pool_server, bad, model="m_a")
    status, pooled = _generate(pool_server, bad)
    assert status == 400 and pooled["error"] == member["error"] and "top_p" in pooled["error"]
    assert _generate(pool_server, {"text_input": "Hi", "max_tokens": 2})[0] == 200


def test_feedback_is_checked_and_counted(pool_server):
    _, body = _generate(pool_server, {"text_input": "Feedback please", "max_tokens": 2})
    before = metric(pool_server, "fastserve_pool_feedback_total", member=body["served_by"])
    status, bad = _generate(pool_server, {"request_id": body["request_id"], "reward": 1.5})
    assert status == 400 and "[0, 1]" in bad["error"]
    status, unknown = _generate(pool_server, {"request_id": "no-such-request", "reward": 0.5})
    assert status == 400 and "unknown" in unknown["error"]
    status, ok = _generate(pool_server, {"request_id": body["request_id"], "reward": 0.75})
    assert status == 200 and ok["served_by"] == body["served_by"]
    assert metric(pool_server, "fastserve_pool_feedback_total", member=body["served_by"]) == before + 1
    status, again = _generate(pool_server, {"request_id": body["request_id"], "reward": 0.75})
    assert status == 400 and "already rated" in again["error"]


def test_deterministic_answers_are_cached(pool_server):
    prompt = {"text_input": "Cache me", "max_tokens": 5, "temperature": 0.0, "exclude_input_in_output": True}
    hits = metric(pool_server, "fastserve_pool_cache_hits_total")
    _, first = _generate(pool_server, prompt)
    _, second = _generate(pool_server, prompt)
    assert second["text_output"] == first["text_output"] and second["served_by"] == first["served_by"]
    assert second["request_id"] != first["request_id"]
    assert metric(pool_server, "fastserve_pool_cache_hits_total") == hits + 1


def test_failover_when_members_are_unloaded_and_traffic_returns(pool_server):
    import tritonclient.http as httpclient

    admin = httpclient.InferenceServerClient(pool_server.http_url)
    admin.unload_model("m_a")
    admin.unload_model("m_b")
    try:
        for i in range(4):
            status, body = _generate(pool_server, {"text_input": f"Still there {i}?", "max_tokens": 2})
            assert status == 200, body
            assert body["served_by"] == "m_c"
        assert metric(pool_server, "fastserve_pool_failovers_total") >= 1
    finally:
        admin.load_model("m_a")
        admin.load_model("m_b")
    deadline = time.monotonic() + 60
    served = set()
    while time.monotonic() < deadline and "m_a" not in served:
        served.add(_generate(pool_server, {"text_input": "Back?", "max_tokens": 2})[1].get("served_by"))
        time.sleep(0.5)
    assert "m_a" in served


def _write(path, text: str) -> None:
    """Replace a file as an editor or a deploy tool would: write beside it, then rename over it."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    tmp.replace(path)


def _wait_for_log(server, text: str, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and text not in server.log():
        time.sleep(0.5)
    return text in server.log()


def test_pool_file_changes_apply_without_restart(pool_server, pool_repo):
    path = pool_repo / "pool" / "pool.json"
    settings = json.loads(path.read_text())
    _write(path, json.dumps({**settings, "exploration": 0.25}))
    assert _wait_for_log(pool_server, "exploration: 0.0 -> 0.25")
    _write(path, "{broken")
    assert _wait_for_log(pool_server, "not applied")
    assert _generate(pool_server, {"text_input": "Still routing", "max_tokens": 2})[0] == 200
    _write(path, json.dumps(settings))
    assert _wait_for_log(pool_server, "exploration: 0.25 -> 0.0")


def test_learned_state_survives_a_restart(pool_repo, pool_server):
    for i in range(10):  # m_a does badly: its estimate falls
        _, body = _generate(pool_server, {"text_input": f"Rate me {i}", "max_tokens": 2, "model": "m_a"})
        assert _generate(pool_server, {"request_id": body["request_id"], "reward": 0.0})[0] == 200
    time.sleep(1.5)  # the estimates gauge is refreshed once a second
    before = metric(pool_server, "fastserve_pool_expected_reward", member="m_a")
    assert before < 0.9
    pool_server.stop()
    restarted = start_server(pool_repo)
    try:
        deadline = time.monotonic() + 30
        after = 0.0
        while time.monotonic() < deadline:
            after = metric(restarted, "fastserve_pool_expected_reward", member="m_a")
            if after:
                break
            time.sleep(0.5)
        assert after == pytest.approx(before, abs=1e-6)
    finally:
        restarted.stop()
