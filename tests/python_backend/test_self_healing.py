"""The engine process dies under load, three times, behind the real tritonserver: the streams in flight
end with an error at once, the model starts a new engine by itself, and the server never exits."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from clients.client import Client, GenerateError
from tests.conftest import start_server
from tests.python_backend.test_model import _stream_request, metric

STREAMS = 8
KILLS = 3


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _engine_pid(server_pid: int) -> int | None:
    """The engine process: a multiprocessing child of the Python backend's stub, below tritonserver."""
    todo, seen = [server_pid], []
    while todo:
        pid = todo.pop()
        for child in _children(pid):
            seen.append(child)
            todo.append(child)
    for pid in seen:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            return pid
    return None


@pytest.fixture(scope="module")
def healing_server(smollm2_repo, tmp_path_factory):
    """SmolLM2 with room for eight streams, sharing the session's engine folder."""
    repo = tmp_path_factory.mktemp("healing")
    entry = repo / "smollm2"
    (entry / "1").mkdir(parents=True)
    shutil.copy(smollm2_repo / "smollm2" / "1" / "model.py", entry / "1" / "model.py")
    (entry / "1" / "engine").symlink_to(smollm2_repo / "smollm2" / "1" / "engine")
    config = (smollm2_repo / "smollm2" / "config.pbtxt").read_text()
    config += 'parameters { key: "num_kv_blocks" value: { string_value: "512" } }\n'
    (entry / "config.pbtxt").write_text(config)
    server = start_server(repo)
    yield server
    server.stop()


def _wait_for_pid(server) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pid = _engine_pid(server.proc.pid)
        if pid is not None:
            return pid
        time.sleep(0.2)
    raise AssertionError("no engine process under the server")


def test_killed_engine_ends_streams_at_once_and_comes_back(healing_server):
    server = healing_server
    client = Client(server.grpc_url, "grpc", "smollm2")
    assert client.generate("Hello", max_tokens=4, temperature=0.0).finish_reason == "length"
    for kill in range(KILLS):
        pid = _wait_for_pid(server)
        outcomes: list = [None] * STREAMS
        ended_at = [0.0] * STREAMS
        threads = [
            threading.Thread(target=_run_stream, args=(server, f"Story {kill}-{i}:", outcomes, ended_at, i))
            for i in range(STREAMS)
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while metric(server, "fastserve_generation_tokens_total") == 0 or _running(server) < STREAMS:
            assert time.monotonic() < deadline, "the streams never all ran"
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        for t in threads:
            t.join(timeout=30)
        for i, (_texts, final, error) in enumerate(outcomes):
            assert error is not None and not final, f"stream {i} did not end with an error"
            assert "engine process exited" in str(error), str(error)
            assert ended_at[i] - killed_at < 5.0, f"stream {i} ended {ended_at[i] - killed_at:.1f} s after the kill"
        assert server.proc.poll() is None, "tritonserver exited"
        deadline = killed_at + 60
        while True:
            try:
                answer = client.generate("Hello again", max_tokens=4, temperature=0.0)
                break
            except GenerateError as e:
                assert "restarting" in str(e) or "exited" in str(e) or "starting" in str(e), str(e)
                assert time.monotonic() < deadline, "no new engine within 60 s"
                time.sleep(0.5)
        assert answer.finish_reason == "length" and answer.num_output_tokens == 4
        assert _engine_pid(server.proc.pid) not in (None, pid)
    deadline = time.monotonic() + 5
    while metric(server, "fastserve_engine_restarts_total", model="smollm2") < KILLS and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, "fastserve_engine_restarts_total", model="smollm2") == KILLS
    assert metric(server, "fastserve_engine_up", model="smollm2") == 1


def _run_stream(server, prompt: str, outcomes: list, ended_at: list, i: int) -> None:
    outcomes[i] = _stream_request(server.grpc_url, "smollm2", prompt + " once upon a time", 400)
    ended_at[i] = time.monotonic()


def _running(server) -> float:
    return metric(server, "fastserve_requests", model="smollm2", state="running")
