"""scripts/sim_schedule.py: the real schedulers on a virtual clock, with a size-aware oracle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import sim_schedule  # noqa: E402

from python_backend.engine.mlfq import MLFQConfig  # noqa: E402


def _args(**kw) -> argparse.Namespace:
    base = dict(
        mix="0.8:16-64,0.2:512-1024",
        seats=2,
        token_budget=512,
        kv_blocks=100000,
        base=0.0184,
        per_seq=0.0073,
        prefill_a=0.016,
        prefill_b=0.0003,
        host_blocks=0,
        swap_block_s=0.0002,
    )
    return argparse.Namespace(**{**base, **kw})


def test_every_job_finishes_and_mlfq_favours_short_jobs_as_the_oracle_does():
    args = _args()
    jobs = sim_schedule.trace(60, 0.289, args.mix, seed=3, in_lo=32, in_hi=128)
    fcfs = sim_schedule.simulate(jobs, "fcfs", args, MLFQConfig())
    mlfq = sim_schedule.simulate(jobs, "mlfq", args, MLFQConfig())
    oracle = sim_schedule.simulate(jobs, "oracle", args, MLFQConfig())
    tokens = sum(n_out for _, _, n_out, _ in jobs)
    for r in (fcfs, mlfq, oracle):
        assert r["tokens"] == tokens  # every job ran to its length, none beyond
    assert mlfq["mean"] < fcfs["mean"] and oracle["mean"] <= mlfq["mean"] * 1.05
    assert abs(mlfq["tok_s"] - fcfs["tok_s"]) / fcfs["tok_s"] < 0.05  # the same work, the same machine


def test_under_kv_pressure_mlfq_swaps_and_pays_for_the_copies():
    jobs = sim_schedule.trace(40, 0.5, "0.8:16-64,0.2:512-1024", seed=1, in_lo=32, in_hi=128)
    tokens = sum(n_out for _, _, n_out, _ in jobs)
    cheap = sim_schedule.simulate(
        jobs, "mlfq", _args(seats=4, kv_blocks=100, host_blocks=4000, swap_block_s=0.0), MLFQConfig()
    )
    dear = sim_schedule.simulate(
        jobs, "mlfq", _args(seats=4, kv_blocks=100, host_blocks=4000, swap_block_s=0.01), MLFQConfig()
    )
    fcfs = sim_schedule.simulate(jobs, "fcfs", _args(seats=4, kv_blocks=100), MLFQConfig())
    assert cheap["tokens"] == dear["tokens"] == fcfs["tokens"] == tokens  # swapped jobs resume and finish
    assert dear["mean"] > cheap["mean"]  # the copies are charged to the steps that make them


def test_a_mix_of_many_classes_runs_with_a_shortest_remaining_oracle():
    mix = "0.5:16-31,0.25:32-63,0.15:64-255,0.1:256-1024"
    args = _args(mix=mix)
    jobs = sim_schedule.trace(50, 0.3, mix, seed=2, in_lo=32, in_hi=128)
    fcfs = sim_schedule.simulate(jobs, "fcfs", args, MLFQConfig())
    oracle = sim_schedule.simulate(jobs, "oracle", args, MLFQConfig())
    assert oracle["tokens"] == fcfs["tokens"] == sum(n_out for _, _, n_out, _ in jobs)
    assert oracle["mean"] < fcfs["mean"]
