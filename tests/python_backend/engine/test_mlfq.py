"""The skip-join MLFQ scheduler on its own (simulated iterations, no model), and with the engine:
swapped-out and resumed sequences give token-for-token the output of uninterrupted ones."""

from __future__ import annotations

import pytest

from python_backend.engine.engine import Engine, EngineConfig
from python_backend.engine.kv_cache import BlockManager
from python_backend.engine.mlfq import LONG_JOB_STEPS, MLFQConfig, MLFQScheduler, PrefillProfile
from python_backend.engine.scheduler import Policy, ScheduledBatch, Scheduler
from python_backend.engine.sequence import SamplingParams, Sequence, Status
from tests.conftest import prompt_ids, run_staggered


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _job(i: int, prompt: int, out: int) -> Sequence:
    return Sequence(request_id=f"j{i}", prompt_ids=[1] * prompt, params=SamplingParams(max_tokens=out), arrival_index=i)


def _mlfq(clock: Clock, seats: int = 2, blocks: int = 256, starvation: float = 1e9) -> MLFQScheduler:
    profile = PrefillProfile(a=0.0, b=0.01, decode_step=0.25)  # 10 ms per prompt token
    return MLFQScheduler(
        BlockManager(blocks, 4, enable_prefix_caching=False),
        seats,
        64,
        None,
        profile,
        MLFQConfig(levels=6, base_quantum_s=1.0, ratio=2.0, starvation_s=starvation),
        clock=clock,
    )


def _simulate(sched: Scheduler, arrivals: dict[int, list[Sequence]], clock: Clock, iterations: int = 400):
    """Drive the scheduler as the engine would: each iteration takes one second, every scheduled job
    computes its tokens, and each that finishes its prompt makes one token. Returns finish iterations."""
    done: dict[str, int] = {}
    runs: dict[str, list[int]] = {}
    for it in range(iterations):
        for seq in arrivals.get(it, []):
            sched.add(seq)
        batch = sched.schedule()
        sched.after_step(batch)
        for seq in [*batch.decodes, *(s for s, _ in batch.prefills)]:
            runs.setdefault(seq.request_id, []).append(it)
            if seq.num_computed == seq.num_tokens:
                seq.output_ids.append(7)
                if len(seq.output_ids) >= seq.params.max_tokens:
                    sched.finish(seq)
                    done[seq.request_id] = it
        sched.charge(batch, 1.0)
        clock.now += 1.0
        if not sched.num_unfinished and it > max(arrivals):
            break
    return done, runs


def test_short_job_behind_long_ones_finishes_first_under_mlfq_last_under_fcfs():
    def arrivals():
        return {0: [_job(0, 8, 60), _job(1, 8, 60)], 10: [_job(2, 8, 5)]}

    clock = Clock()
    fcfs = Scheduler(BlockManager(256, 4, enable_prefix_caching=False), 2, 64, Policy())
    done_fcfs, _ = _simulate(fcfs, arrivals(), clock)
    assert done_fcfs["j2"] > max(done_fcfs["j0"], done_fcfs["j1"])  # it waited for a seat
    clock = Clock()
    done_mlfq, _ = _simulate(_mlfq(clock), arrivals(), clock)
    assert done_mlfq["j2"] < min(done_mlfq["j0"], done_mlfq["j1"])
    assert done_mlfq["j2"] <= 10 + 5 + 1  # it ran at once: the long jobs had sunk below the top queue


def test_skip_join_places_long_prompts_below_the_top_queue():
    sched = _mlfq(Clock())
    assert sched.quanta == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    assert sched.entry_level(50) == 0  # 0.5 s of prefill fits the top quantum
    assert sched.entry_level(500) == 3  # 5 s: queues 0-2 (1, 2, 4 s) would drop it at once
    assert sched.entry_level(10**6) == 5  # longer than any quantum: the last queue
    long, short = _job(0, 500, 4), _job(1, 50, 4)
    sched.add(long)
    sched.add(short)
    assert (long.queue_level, short.queue_level) == (3, 0)
    batch = sched.schedule()
    assert [s for s, _ in batch.prefills][0] is short  # the top queue goes first


def test_default_queues_end_where_long_jobs_begin():
    profile = PrefillProfile(a=0.0, b=0.001, decode_step=0.01)
    sched = MLFQScheduler(BlockManager(8, 4), 2, 64, None, profile, MLFQConfig(base_quantum_s=0.1, ratio=2.0))
    above_last = sum(sched.quanta[:-1])
    assert above_last >= LONG_JOB_STEPS * profile.decode_step > above_last - sched.quanta[-2]
    assert sched.quanta == [0.1, 0.2, 0.4, 0.8]  # 0.7 s above the last queue covers 64 x 10 ms


def test_long_jobs_in_the_last_queue_keep_arrival_order():
    """A newer long job pauses an older one only while it passes through the queues above the last;
    there, arrival order holds, so the job nearest completion is not kept waiting."""
    clock = Clock()
    profile = PrefillProfile(a=0.0, b=0.01, decode_step=1.0)  # a job is charged 1 s per decode step
    sched = MLFQScheduler(
        BlockManager(256, 4, enable_prefix_caching=False),
        1,
        64,
        None,
        profile,
        MLFQConfig(levels=4, base_quantum_s=1.0, ratio=2.0, starvation_s=1e9),
        clock=clock,
    )
    assert sched.quanta == [1.0, 2.0, 4.0, 8.0]
    done, runs = _simulate(sched, {0: [_job(0, 4, 60)], 40: [_job(1, 4, 60)]}, clock)
    assert done["j0"] < done["j1"]
    # its prefill (0.04 s) and 1 + 2 + 4 decode steps in the upper queues, then j0 ran on
    assert len([it for it in runs["j1"] if it < done["j0"]]) == 8


def test_no_job_waits_beyond_the_starvation_bound():
    clock = Clock()
    sched = _mlfq(clock, seats=1, starvation=6.0)
    # a long job, then a stream of short jobs that would keep it out of the only seat forever
    arrivals = {0: [_job(0, 4, 40)], **{t: [_job(t, 4, 3)] for t in range(3, 200, 3)}}
    done, runs = _simulate(sched, arrivals, clock, iterations=300)
    its = runs["j0"]
    gaps = [b - a for a, b in zip(its, its[1:])]
    assert "j0" in done
    assert max(gaps) <= 6 + 1, gaps  # promoted once it had waited the bound, and run at the next iteration
    assert sched.num_promotions > 0


def test_a_promoted_job_gets_one_top_quantum_then_returns_to_its_queue():
    """Promotion guarantees a starved job service; it does not restart its descent through every
    queue, which would run a long job ahead of the short ones for all the upper quanta."""
    clock = Clock()
    sched = _mlfq(clock, seats=1, starvation=6.0)
    job = _job(0, 4, 100)
    sched.add(job)
    job.queue_level = 4
    clock.now = 7.0
    batch = sched.schedule()
    assert job.queue_level == 0 and sched.num_promotions == 1 and batch.prefills[0][0] is job
    sched.after_step(batch)
    job.output_ids.append(7)
    sched.charge(batch, 1.0)  # its prefill: 0.04 s of the 1 s top quantum
    assert job.queue_level == 0
    for _ in range(4):  # decode steps of 0.25 s use up the top quantum
        batch = sched.schedule()
        sched.after_step(batch)
        job.output_ids.append(7)
        sched.charge(batch, 1.0)
    assert job.queue_level == 4 and job.quantum_used == 0.0


def test_a_senior_job_runs_ahead_of_the_queues_until_it_ends():
    """With senior_s set, a job in the system that long is no longer paused for newer short jobs."""
    clock = Clock()
    profile = PrefillProfile(a=0.0, b=0.01, decode_step=0.25)
    sched = MLFQScheduler(
        BlockManager(256, 4, enable_prefix_caching=False),
        1,
        64,
        None,
        profile,
        MLFQConfig(levels=6, base_quantum_s=1.0, ratio=2.0, starvation_s=1e9, senior_s=10.0),
        clock=clock,
    )
    arrivals = {0: [_job(0, 4, 40)], **{t: [_job(t, 4, 3)] for t in range(2, 200, 2)}}
    done, runs = _simulate(sched, arrivals, clock, iterations=300)
    its = runs["j0"]
    after = [it for it in its if it > 10]
    assert after and after == list(range(after[0], done["j0"] + 1))  # every iteration from then on
    assert after[0] <= 12 and sched.num_seniors >= 1
    assert any(b - a > 1 for a, b in zip(its, its[1:]) if a < 10)  # before, short jobs paused it
    without = _mlfq(Clock(), seats=1)
    done_without, _ = _simulate(
        without, {0: [_job(0, 4, 40)], **{t: [_job(t, 4, 3)] for t in range(2, 200, 2)}}, without.clock, iterations=300
    )
    assert done["j0"] < done_without.get("j0", float("inf"))  # without: paused for every short job


def test_request_priority_comes_before_the_queues():
    sched = _mlfq(Clock(), seats=1)
    low, high = _job(0, 4, 4), _job(1, 4, 4)
    low.priority, high.priority = 1, 0
    sched.add(low)
    sched.add(high)
    assert sched.schedule().prefills[0][0] is high


# ---- with the engine and SmolLM2: swap out, swap in, recompute ------------------------------------
class CountingBlocks(BlockManager):
    """Counts how often the scheduler looks at the free-block count: its work per iteration."""

    looks = 0

    @property
    def num_free(self) -> int:
        CountingBlocks.looks += 1
        return super().num_free


def test_a_full_memory_iteration_does_work_linear_in_the_queue_and_takes_from_no_more_urgent_job():
    """Memory full of running jobs and a long queue: one iteration looks at each job a bounded number
    of times (a scan of all jobs per waiting job would make the host the bottleneck), and a waiting
    job evicts only jobs ranked after it."""
    profile = PrefillProfile(a=0.0, b=0.01, decode_step=0.25)
    blocks = CountingBlocks(64, 4, enable_prefix_caching=False)
    sched = MLFQScheduler(
        blocks, 512, 100000, None, profile, MLFQConfig(levels=4, base_quantum_s=1.0, ratio=2.0), clock=Clock()
    )
    running = [_job(i, 15, 100) for i in range(16)]  # 16 x 4 blocks (room for one more token each): the pool
    for seq in running:
        sched.add(seq)
    assert len(sched.schedule().prefills) == 16
    sched.after_step(ScheduledBatch(prefills=[(s, 15) for s in running]))
    for seq in running:
        seq.output_ids.append(7)
        seq.queue_level = 3  # long jobs, sunk to the last queue
    waiting = [_job(100 + i, 16, 4) for i in range(2000)]
    for seq in waiting:
        sched.add(seq)
        seq.queue_level = 3  # arrived after the running jobs, in the same queue: ranked after them
    CountingBlocks.looks = 0
    batch = sched.schedule()
    assert CountingBlocks.looks < 10 * len(sched.jobs)
    assert sorted(s.request_id for s in batch.decodes) == sorted(s.request_id for s in running)
    assert not batch.prefills and all(s.status is Status.RUNNING for s in running)


@pytest.mark.parametrize("swap_space_gb,expect", [(1.0, "swap"), (1e-9, "recompute")])
def test_preempted_sequences_resume_token_for_token(
    smollm2_engine_dir, smollm2_source, prompt_set, swap_space_gb, expect
):
    _, tok = smollm2_source
    prompts = [prompt_ids(tok, p) for p in prompt_set[:10]]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    reference = Engine(smollm2_engine_dir, EngineConfig(num_kv_blocks=512))
    want = [r.token_ids for r in reference.generate(prompts, params)]
    # a new arrival's prefill fits the 50 ms top quantum, while running jobs sink below it within a few
    # steps, so each arrival preempts an older job; 18 blocks of 16 tokens hold about four of these
    # sequences, so a preempted job's blocks must go to host memory (or be dropped) to make room
    engine = Engine(
        smollm2_engine_dir,
        EngineConfig(
            num_kv_blocks=18, scheduler="mlfq", swap_space_gb=swap_space_gb, mlfq_base_quantum_s=0.05, max_num_seqs=4
        ),
    )
    got = [r.token_ids for r in run_staggered(engine, prompts, params, every=3)]
    state = engine.scheduler.state()
    if expect == "swap":
        assert state["swap_outs"] > 0 and state["swap_ins"] > 0, state
    else:
        assert state["swap_outs"] == 0 and state["recomputes"] > 0, state
    assert got == want
    assert engine.blocks.num_used == 0 and state["host_blocks_used"] == 0 and state["swapped"] == 0


def test_bad_mlfq_settings_are_named():
    with pytest.raises(ValueError, match="mlfq_levels >= 0"):
        MLFQScheduler(BlockManager(8, 4), 2, 64, None, PrefillProfile(0.0, 0.01, 0.1), MLFQConfig(levels=-1))
    with pytest.raises(ValueError, match="mlfq_senior_s >= 0; got .* -1.0"):
        MLFQScheduler(BlockManager(8, 4), 2, 64, None, PrefillProfile(0.0, 0.01, 0.1), MLFQConfig(senior_s=-1.0))


def test_a_job_is_charged_its_own_service_not_the_batch_wall_time():
    """In a big batch an iteration takes long; a short job's demotion must not depend on that."""
    profile = PrefillProfile(a=0.0, b=0.01, decode_step=0.25)
    sched = _mlfq(Clock())
    sched.profile = profile
    seq = _job(0, 8, 40)
    sched.add(seq)
    sched.charge(ScheduledBatch(prefills=[(seq, 8)]), seconds=50.0)
    assert seq.queue_level == 0 and seq.quantum_used == pytest.approx(0.08)
    for _ in range(4):
        sched.charge(ScheduledBatch(decodes=[seq]), seconds=50.0)
    assert seq.queue_level == 1 and seq.quantum_used == 0.0  # 0.08 + 4 x 0.25 s used the 1 s quantum
