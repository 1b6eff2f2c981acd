"""Replay an online trace through the real schedulers (scheduler.py, mlfq.py) on a virtual clock,
with step times from a cost model instead of a model. Minutes of serving become a second, so
scheduler settings can be compared over many traces before a real benchmark, which decides.

    python scripts/sim_schedule.py --rate 0.289 --seeds 20 --variant levels=0 --variant senior=20

Cost model (seconds): a step costs `base + per_seq * decodes + per_token * prefill_tokens`; the
defaults model SmolLM2 in bfloat16 on a small CPU host with two decode seats (a one-sequence decode
step about 26 ms, two about 33 ms, prefill 16 ms + 0.3 ms per token).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.online import parse_mix  # noqa: E402
from python_backend.engine.kv_cache import BlockManager  # noqa: E402
from python_backend.engine.mlfq import MLFQConfig, MLFQScheduler, PrefillProfile  # noqa: E402
from python_backend.engine.scheduler import Scheduler  # noqa: E402
from python_backend.engine.sequence import SamplingParams, Sequence  # noqa: E402


def trace(n: int, rate: float, mix: str, seed: int, in_lo: int, in_hi: int) -> list[tuple[float, int, int, str]]:
    """(arrival, prompt tokens, output tokens, class) with Poisson arrivals."""
    classes = parse_mix(mix)
    rng = random.Random(seed)
    total = sum(w for w, *_ in classes)
    t, jobs = 0.0, []
    for _ in range(n):
        if jobs:
            t += rng.expovariate(rate)
        x, acc = rng.random() * total, 0.0
        for w, lo, hi, name in classes:  # noqa: B007 (the chosen class is read after the loop)
            acc += w
            if x <= acc:
                break
        jobs.append((t, rng.randint(in_lo, in_hi), rng.randint(lo, hi), name))
    return jobs


class CountingSwapper:
    """Stands in for kv_swap.KVSwapper: a host pool of `num_host_blocks`, counting the blocks moved so
    that the step that moves them can be charged for the copy."""

    def __init__(self, num_host_blocks: int):
        self.num_host_blocks = num_host_blocks
        self.host_blocks_used = 0
        self.moved = 0

    def can_hold(self, n: int) -> bool:
        return self.host_blocks_used + n <= self.num_host_blocks

    def swap_out(self, blocks: list[int]) -> int:
        self.host_blocks_used += len(blocks)
        self.moved += len(blocks)
        return len(blocks)

    def swap_in(self, held: int, blocks: list[int]) -> None:
        self.host_blocks_used -= held
        self.moved += held

    def drop(self, held: int) -> None:
        self.host_blocks_used -= held

    def fence(self) -> None:
        pass


class SizeOracle(MLFQScheduler):
    """A bound no size-blind policy can beat on the short jobs, preempting as MLFQ does. With a two-class
    mix: two classes by the job's true output length (short first, each class in arrival order); with
    more classes (short_max None): shortest remaining output first."""

    short_max: int | None = None

    def key(self, seq: Sequence) -> tuple:
        if self.short_max is None:
            return (seq.params.max_tokens - len(seq.output_ids), seq.arrival_index)
        return (seq.params.max_tokens > self.short_max, seq.arrival_index)


def simulate(jobs, policy: str, args, mlfq: MLFQConfig) -> dict:
    now = [0.0]
    # prefix caching as the engine has it: a job preempted for recompute finds the blocks it gave up
    # while no one has reused them (prompts below are distinct, so nothing else is shared)
    blocks = BlockManager(args.kv_blocks, 16, enable_prefix_caching=True)
    profile = PrefillProfile(a=args.prefill_a, b=args.prefill_b, decode_step=args.base + args.per_seq)
    if policy == "fcfs":
        sched = Scheduler(blocks, args.seats, args.token_budget)
    else:
        kind = SizeOracle if policy == "oracle" else MLFQScheduler
        swapper = CountingSwapper(args.host_blocks) if args.host_blocks else None
        sched = kind(blocks, args.seats, args.token_budget, swapper, profile, mlfq, clock=lambda: now[0])
        if policy == "oracle":
            sched.short_max = max((hi for _, _, hi, name in parse_mix(args.mix) if name == "short"), default=None)
    seqs, i, done = [], 0, []
    while len(done) < len(jobs):
        while i < len(jobs) and jobs[i][0] <= now[0]:
            at, n_in, n_out, _ = jobs[i]
            seq = Sequence(
                request_id=str(i), prompt_ids=[i + 1] * n_in, params=SamplingParams(max_tokens=n_out), arrival_index=i
            )
            seq.timing.arrival = at
            sched.add(seq)
            seqs.append(seq)
            i += 1
        batch = sched.schedule()
        if batch.empty:
            now[0] = jobs[i][0]
            continue
        cost = (
            args.base
            + args.per_seq * len(batch.decodes)
            + sum(args.prefill_a + args.prefill_b * n for _, n in batch.prefills)
        )
        sched.after_step(batch)
        swapper = getattr(sched, "swapper", None)
        if swapper is not None:  # the copies of this schedule() and of the last step's proactive()
            cost += args.swap_block_s * swapper.moved
            swapper.moved = 0
        now[0] += cost
        sched.proactive()
        made = list(batch.decodes) + [s for s, _ in batch.prefills if s.num_computed == s.num_tokens]
        for seq in made:
            seq.output_ids.append(0)
            if len(seq.output_ids) >= seq.params.max_tokens:
                seq.timing.finished = now[0]
                sched.finish(seq)
                done.append(seq)
        sched.charge(batch, cost)
    jct = sorted(s.timing.finished - s.timing.arrival for s in seqs)
    span = max(s.timing.finished for s in seqs) - min(s.timing.arrival for s in seqs)
    return {
        "mean": statistics.fmean(jct),
        "p99": jct[min(len(jct) - 1, int(0.99 * len(jct)))],
        "tok_s": sum(len(s.output_ids) for s in seqs) / span,
        "tokens": sum(len(s.output_ids) for s in seqs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=0.289)
    ap.add_argument("--num-requests", type=int, default=120)
    ap.add_argument("--mix", default="0.8:16-64,0.2:512-1024")
    ap.add_argument("--input-len", type=int, nargs=2, default=(32, 128))
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--seats", type=int, default=2)
    ap.add_argument("--token-budget", type=int, default=512)
    ap.add_argument("--kv-blocks", type=int, default=100000)
    ap.add_argument("--base", type=float, default=0.0184)
    ap.add_argument("--per-seq", type=float, default=0.0073)
    ap.add_argument("--prefill-a", type=float, default=0.016)
    ap.add_argument("--prefill-b", type=float, default=0.0003)
    ap.add_argument("--host-blocks", type=int, default=0, help="MLFQ's host pool for swapped KV (0: recompute)")
    ap.add_argument("--swap-block-s", type=float, default=0.0002, help="seconds to copy one KV block either way")
    ap.add_argument(
        "--load",
        type=float,
        default=0.0,
        help="arrival rate as this share of FCFS's measured capacity (all requests at once), instead of --rate",
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        help="MLFQ settings as key=value,... over MLFQConfig fields (e.g. levels=5,senior_s=20)",
    )
    args = ap.parse_args()
    variants = (args.variant or [""]) + ["oracle"]
    rows = {v: [] for v in variants}
    for seed in range(args.seeds):
        rate = args.rate
        if args.load:  # as clients/online.py does: the same requests all at once under FCFS
            burst = [
                (0.0, n_in, n_out, c)
                for _, n_in, n_out, c in trace(args.num_requests, 1.0, args.mix, seed, *args.input_len)
            ]
            cap = simulate(burst, "fcfs", args, MLFQConfig())
            rate = args.load * cap["tok_s"] / (cap["tokens"] / len(burst))
        jobs = trace(args.num_requests, rate, args.mix, seed, *args.input_len)
        f = simulate(jobs, "fcfs", args, MLFQConfig())
        for v in variants:
            kw = {
                k: int(x) if k == "levels" else float(x)
                for k, x in (p.split("=") for p in v.split(",") if p and v != "oracle")
            }
            m = simulate(jobs, "oracle" if v == "oracle" else "mlfq", args, MLFQConfig(**kw))
            rows[v].append(
                {
                    "mean_ratio": f["mean"] / m["mean"],
                    "p99_ratio": f["p99"] / m["p99"],
                    "tput_ratio": m["tok_s"] / f["tok_s"],
                }
            )
    out = {
        v: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        | {
            "seeds_meeting_all": sum(
                r["mean_ratio"] >= 2 and r["p99_ratio"] >= 1 and r["tput_ratio"] >= 0.95 for r in rs
            )
        }
        for v, rs in rows.items()
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
