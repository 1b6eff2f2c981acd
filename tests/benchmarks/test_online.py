"""The online load generator: the arrival trace, the mix, and one small run of both policies."""

from __future__ import annotations

import argparse
import json
import statistics

import pytest

from benchmarks.online import make_trace, online, parse_mix
from tests.conftest import build_entry, save_tiny_model


def test_trace_follows_rate_mix_and_seed():
    mix = parse_mix("0.8:16-64,0.2:512-1024")
    assert [m[3] for m in mix] == ["short", "long"]
    prompts = ["p"] * 4000
    trace = make_trace(prompts, 2.0, "poisson", mix, seed=3)
    gaps = [b.at - a.at for a, b in zip(trace, trace[1:])]
    assert statistics.fmean(gaps) == pytest.approx(0.5, rel=0.06)
    share_long = sum(j.kind == "long" for j in trace) / len(trace)
    assert share_long == pytest.approx(0.2, abs=0.03)
    assert all(16 <= j.max_tokens <= 64 for j in trace if j.kind == "short")
    assert all(512 <= j.max_tokens <= 1024 for j in trace if j.kind == "long")
    assert [j.at for j in make_trace(prompts, 2.0, "poisson", mix, seed=3)] == [j.at for j in trace]
    bursty = make_trace(prompts, 2.0, "bursty", mix, seed=3)
    bgaps = [b.at - a.at for a, b in zip(bursty, bursty[1:])]
    assert statistics.fmean(bgaps) == pytest.approx(0.5, rel=0.15)
    assert statistics.stdev(bgaps) > 1.5 * statistics.stdev(gaps)  # clumped arrivals, same mean rate


def test_mix_parsing_and_bad_mixes():
    assert parse_mix("1:10") == [(1.0, 10, 10, "class-0")]  # a fixed length
    for bad in ("abc", "0.5:64-16", "-1:1-2", "0.5:0-3"):
        with pytest.raises(SystemExit):
            parse_mix(bad)


def test_online_run_compares_policies_and_writes_json_and_plot(tmp_path, smollm2_source):
    folder = save_tiny_model(tmp_path / "src", "llama", smollm2_source[1], seed=4)
    build_entry(tmp_path / "repo", str(folder), "tiny", "--max-num-seqs", "2")
    out = tmp_path / "online.json"
    args = argparse.Namespace(
        repository=str(tmp_path / "repo"),
        model="tiny",
        engine_dir=None,
        device="cpu",
        dtype=None,
        url=None,
        cuda_graphs=True,
        policies="fcfs,mlfq",
        load=0.8,
        rate=0.0,
        arrivals="poisson",
        mix="0.7:2-4,0.3:20-30",
        num_requests=12,
        input_len=4,
        input_len_max=12,
        seed=1,
        out=str(out),
    )
    result = online(args)
    assert result["capacity"]["requests_per_s"] > 0
    assert set(result["policies"]) == {"fcfs", "mlfq"}
    for p in result["policies"].values():
        assert p["requests"] == 12 and p["jct_s"]["p99"] >= p["jct_s"]["p50"] > 0
        assert set(p["by_class"]) == {"short", "long"}
    assert "quanta_s" in result["policies"]["mlfq"]["scheduler"]
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert json.loads(out.read_text())["policies"]["fcfs"]["requests"] == 12


def test_capacity_counts_completions_while_requests_wait_not_the_drain():
    from benchmarks.online import saturated_rate

    # admitted at 10 per second for 10 s, each done 1 s later; one long job runs alone until 100 s
    records = [{"admitted_at": i / 10, "finished_at": i / 10 + 1.0} for i in range(100)]
    records.append({"admitted_at": 0.0, "finished_at": 100.0})
    rate, how = saturated_rate(records, span=100.0)
    assert 9.0 < rate < 11.0 and "waited" in how  # the whole run would say 1.01 per second
    few = records[:5] + [records[-1]]
    rate, how = saturated_rate(few, span=100.0)
    assert rate == len(few) / 100.0 and "whole run" in how
