"""CPU engines take turns: while one holds the host's lock for a step, another engine's step waits."""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext

from python_backend.engine.cpu_turns import CpuTurns, lock_path, turns_for


def test_a_second_engine_waits_for_the_first_ones_step(tmp_path):
    path = tmp_path / "cpu.lock"
    first, second = CpuTurns(path), CpuTurns(path)
    entered = threading.Event()
    released_at = []
    took_at = []

    def other() -> None:
        entered.set()
        with second:
            took_at.append(time.monotonic())

    with first:
        thread = threading.Thread(target=other)
        thread.start()
        entered.wait()
        time.sleep(0.2)
        assert not took_at  # still waiting
        released_at.append(time.monotonic())
    thread.join(timeout=5)
    assert took_at and took_at[0] >= released_at[0]
    first.close()
    second.close()


def test_only_cpu_engines_that_want_turns_take_them(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSERVE_CPU_LOCK", str(tmp_path / "mine.lock"))
    assert lock_path() == tmp_path / "mine.lock"
    assert isinstance(turns_for("cpu", True), CpuTurns)
    assert isinstance(turns_for("cpu", False), nullcontext)
    assert isinstance(turns_for("cuda", True), nullcontext)


def test_an_unopenable_lock_runs_without_turns(tmp_path, caplog):
    turns = CpuTurns(tmp_path / "missing" / "cpu.lock")
    with turns:  # no lock, no error
        pass
    assert "will not take turns" in caplog.text
    turns.close()
