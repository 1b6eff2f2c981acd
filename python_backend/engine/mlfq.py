"""FastServe's scheduler: a skip-join multi-level feedback queue with token-level preemption and KV
swapping (Wu et al., "Fast Distributed Inference Serving for Large Language Models", arXiv 2305.05920).

Run-to-completion FCFS makes short jobs wait behind long ones. Since a job makes one token per
iteration, it can be preempted after any token, so this scheduler re-decides the whole batch every
iteration:

- Queues 0..L-1 have quanta q_i = base * ratio**i seconds of service. A job is charged its own
  service: what its tokens of the iteration would take alone by the start-up profile (a one-sequence
  decode step per token, the prefill time of its chunk), not the iteration's wall time, which grows
  with the batch. Charged wall time, short jobs under load would use up the upper queues' quanta
  within tens of tokens, sink among the long jobs and become the first victims of eviction.
  Once a job has used its queue's quantum it moves one queue down. By default L is chosen so that
  the queues above the last span LONG_JOB_STEPS decode steps: a job still running then is a long
  one, and the last queue runs long jobs in arrival order. More queues would
  keep long jobs in least-attained-service order, which pauses the ones nearest completion for newer
  ones: their mean completion time grows far beyond what the short jobs gain. (64 steps rather than
  128: short answers are done by then, and long jobs spend less time pausing each other, which
  lowers the mean JCT.)
- Skip-join: a new job enters the highest queue whose quantum covers its prefill time (estimated
  from its input length with the profile the engine measured at start-up), so a long prompt never
  enters queues it would fall out of at once.
- Each iteration the batch is filled in order of (request priority, queue, arrival), within the seats,
  the token budget and the KV blocks. A job left out keeps its KV cache and resumes exactly where it
  stopped (token-level preemption).
- Device blocks for a more urgent job come from the least urgent paused jobs: their KV is swapped to
  host memory (kv_swap.py) or, with the host pool full, dropped and recomputed later.
- Proactively, after the batch is launched, swapped-out jobs next in line are swapped back in while
  free blocks allow, and when free blocks run low the least urgent paused jobs are swapped out ahead
  of need.
- A job that has not run for `starvation_s` goes back to the top queue for one quantum, then returns
  to the queue it was promoted from. Stepping down through every queue again instead, a promoted
  long job would run ahead of the short ones for all the upper quanta (seconds on a slow device)
  and undo what MLFQ is for: with the return, mean JCT stays clearly lower (scripts/sim_schedule.py
  replays traces through this scheduler to compare such choices).
- Optionally (`senior_s` > 0), a job in the system longer than `senior_s` becomes senior: it runs
  ahead of every queue, seniors in arrival order, until it finishes. MLFQ favours short jobs at the
  long ones' expense; this bounds how far the longest fall behind FCFS, which is what sets the p99.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from python_backend.engine.kv_cache import BlockManager
from python_backend.engine.kv_swap import KVSwapper
from python_backend.engine.scheduler import ScheduledBatch, Scheduler
from python_backend.engine.sequence import Sequence, Status


@dataclass
class PrefillProfile:
    """Prefill seconds as a + b * tokens, fitted to timings taken at engine start-up, and the time of a
    one-sequence decode step."""

    a: float
    b: float
    decode_step: float

    def prefill_time(self, tokens: int) -> float:
        return self.a + self.b * tokens

    @classmethod
    def fit(cls, samples: list[tuple[int, float]], decode_step: float) -> PrefillProfile:
        n = len(samples)
        mx = sum(x for x, _ in samples) / n
        my = sum(y for _, y in samples) / n
        var = sum((x - mx) ** 2 for x, _ in samples)
        b = max(0.0, sum((x - mx) * (y - my) for x, y in samples) / var) if var else 0.0
        return cls(a=max(0.0, my - b * mx), b=b, decode_step=decode_step)


LONG_JOB_STEPS = 64  # one-sequence decode steps of service after which a job counts as long


@dataclass
class MLFQConfig:
    levels: int = 0  # 0: from the profile (see MLFQScheduler.__init__)
    base_quantum_s: float = 0.0  # 0: from the profile (see MLFQScheduler.__init__)
    ratio: float = 2.0
    starvation_s: float = 30.0
    senior_s: float = 0.0  # 0: no seniority (see the module docstring)
    low_watermark: float = 0.02  # proactive swap-out below this share of free device blocks
    high_watermark: float = 0.25  # proactive swap-in only while this share stays free (no thrashing)


class MLFQScheduler(Scheduler):
    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        swapper: KVSwapper | None,
        profile: PrefillProfile,
        config: MLFQConfig | None = None,
        clock=time.perf_counter,
    ):
        # not Scheduler.__init__: its waiting/running lists are views of `jobs` here
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_preemptions = 0
        self.prefix_hit_tokens = 0
        self.cfg = cfg = config or MLFQConfig()
        if cfg.levels < 0 or cfg.ratio < 1.0 or cfg.base_quantum_s < 0 or cfg.starvation_s <= 0 or cfg.senior_s < 0:
            raise ValueError(
                f"MLFQ settings: need mlfq_levels >= 0 (0: from the profile), mlfq_ratio >= 1, "
                f"mlfq_base_quantum_s >= 0 and "
                f"mlfq_starvation_s > 0 and mlfq_senior_s >= 0; got {cfg.levels}, {cfg.ratio}, "
                f"{cfg.base_quantum_s}, {cfg.starvation_s}, {cfg.senior_s}"
            )
        self.swapper = swapper
        self.profile = profile
        self.clock = clock
        # default base quantum: a 256-token prefill or four decode steps, whichever is longer
        base = cfg.base_quantum_s or max(profile.prefill_time(256), 4 * profile.decode_step)
        self.quanta = [base * cfg.ratio**i for i in range(cfg.levels or self.auto_levels(base, cfg.ratio, profile))]
        self.jobs: list[Sequence] = []  # every unfinished sequence
        self.num_swap_outs = 0
        self.num_swap_ins = 0
        self.num_recomputes = 0
        self.num_promotions = 0
        self.num_seniors = 0
        self.num_pauses = 0  # token-level preemptions: a job left out of the batch, its KV kept
        self._order: list[Sequence] = []  # this iteration's jobs, most urgent first
        self._chosen: set[int] = set()
        self._cursor = -1  # _make_room's next candidate victim, walking back from the end of _order
        self._evictable_from: list[int] = [0]

    @staticmethod
    def auto_levels(base: float, ratio: float, profile: PrefillProfile, cap: int = 16) -> int:
        """The fewest queues whose quanta above the last cover LONG_JOB_STEPS one-sequence decode steps."""
        span, levels = 0.0, 1
        while span < LONG_JOB_STEPS * profile.decode_step and levels < cap:
            span += base * ratio ** (levels - 1)
            levels += 1
        return levels

    # ---- queues ---------------------------------------------------------------------------------
    def key(self, seq: Sequence) -> tuple:
        return (seq.priority, not seq.senior, 0 if seq.senior else seq.queue_level, seq.arrival_index)

    def entry_level(self, num_prompt_tokens: int) -> int:
        """Skip-join: the highest queue whose quantum covers the job's estimated prefill time."""
        t = self.profile.prefill_time(num_prompt_tokens)
        for level, q in enumerate(self.quanta):
            if q >= t:
                return level
        return len(self.quanta) - 1

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        seq.queue_level = self.entry_level(len(seq.prompt_ids))
        seq.quantum_used = 0.0
        seq.last_run = seq.joined_at = self.clock()
        self.jobs.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.jobs)

    @property
    def waiting(self) -> list[Sequence]:
        return [s for s in self.jobs if s.status is Status.WAITING]

    @property
    def running(self) -> list[Sequence]:
        return [s for s in self.jobs if s.status is Status.RUNNING]

    @property
    def swapped(self) -> list[Sequence]:
        return [s for s in self.jobs if s.status is Status.SWAPPED]

    def queue_lengths(self) -> list[int]:
        counts = [0] * len(self.quanta)
        for s in self.jobs:
            counts[s.queue_level] += 1
        return counts

    def charge(self, batch: ScheduledBatch, seconds: float) -> None:
        """Charge every job of the iteration its own service (see the module docstring; `seconds`, the
        iteration's wall time, is shared by the whole batch) and demote those past their quantum."""
        work = [(seq, self.profile.decode_step) for seq in batch.decodes]
        work += [(seq, self.profile.prefill_time(n)) for seq, n in batch.prefills]
        for seq, used in work:
            if seq.finished:
                continue
            seq.quantum_used += used
            if seq.quantum_used >= self.quanta[seq.queue_level] and seq.queue_level < len(self.quanta) - 1:
                seq.queue_level = max(seq.queue_level + 1, seq.home_level)
                seq.home_level = 0
                seq.quantum_used = 0.0

    def _promote_starved(self, now: float) -> None:
        senior_s = self.cfg.senior_s
        for seq in self.jobs:
            if senior_s and not seq.senior and now - seq.joined_at > senior_s:
                seq.senior = True
                self.num_seniors += 1
            if now - seq.last_run > self.cfg.starvation_s and seq.queue_level > 0:
                seq.home_level = seq.queue_level
                seq.queue_level = 0
                seq.quantum_used = 0.0
                seq.last_run = now
                self.num_promotions += 1

    # ---- memory ---------------------------------------------------------------------------------
    def _evict(self, victim: Sequence) -> None:
        """Take a paused job's device blocks: to host memory if it has room, else drop them."""
        if self.swapper is not None and victim.block_table and self.swapper.can_hold(len(victim.block_table)):
            victim.swap_buffer = self.swapper.swap_out(victim.block_table)
            victim.swapped_blocks = len(victim.block_table)
            self.blocks.free(victim.block_table)  # contents stay valid in the prefix cache until reused
            victim.block_table = []
            victim.status = Status.SWAPPED
            self.num_swap_outs += 1
        else:
            self._free(victim)
            victim.status = Status.WAITING
            self.num_recomputes += 1
        victim.num_preemptions += 1
        self.num_preemptions += 1

    def _make_room(self, need: int, position: int) -> bool:
        """Free `need` device blocks by evicting running jobs ranked after `position` in this
        iteration's order, least urgent first; a job never takes memory from a more urgent one.
        Jobs after `position` are untouched until the loop reaches them, so one cursor walking back
        from the end serves the whole iteration (a scan per job would be quadratic in the queue: with
        hundreds waiting, the host time per step grows to tens of milliseconds and throughput
        collapses). Evicts nothing unless the need can be met."""
        if need <= self.blocks.num_free:
            return True
        order, cursor = self._order, self._cursor
        reachable = self._evictable_from[position + 1] - self._evictable_from[cursor + 1]
        if need > self.blocks.num_free + reachable:
            return False
        while self.blocks.num_free < need and cursor > position:
            victim = order[cursor]
            if victim.status is Status.RUNNING and victim.block_table:
                self._evict(victim)
            cursor -= 1
        self._cursor = cursor
        return self.blocks.num_free >= need

    def _swap_in(self, seq: Sequence) -> None:
        blocks = self.blocks.allocate(seq.swapped_blocks)
        self.swapper.swap_in(seq.swap_buffer, blocks)
        seq.block_table = blocks
        seq.swap_buffer = None
        seq.swapped_blocks = 0
        seq.status = Status.RUNNING
        self.num_swap_ins += 1

    # ---- the batch ------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        now = self.clock()
        self._promote_starved(now)
        order = sorted(self.jobs, key=self.key)
        self._order, self._cursor = order, len(order) - 1
        # device blocks held by running jobs at each position and after it: what eviction can reach
        self._evictable_from = [0] * (len(order) + 1)
        for i in range(len(order) - 1, -1, -1):
            held = len(order[i].block_table) if order[i].status is Status.RUNNING else 0
            self._evictable_from[i] = self._evictable_from[i + 1] + held
        batch = ScheduledBatch()
        budget, seats = self.max_num_batched_tokens, self.max_num_seqs
        chosen: set[int] = set()
        for i, seq in enumerate(order):
            if seats == 0 or budget == 0:
                break
            if seq.status is Status.SWAPPED:
                if not self._make_room(seq.swapped_blocks, i):
                    continue
                self._swap_in(seq)
            if seq.status is Status.WAITING and not seq.block_table and self.blocks.enable_prefix_caching:
                self._take_cached_prefix(seq)
            n = min(seq.num_uncomputed, budget)
            need = self.blocks.blocks_for(seq.num_computed + n) - len(seq.block_table)
            if not self._make_room(need, i) or not self._grow(seq, n):
                if seq.status is Status.WAITING:
                    self._free(seq)  # give back prefix blocks taken above
                continue
            if seq.status is Status.WAITING:
                self.prefix_hit_tokens += len(seq.block_hashes) * self.blocks.block_size
            seq.status = Status.RUNNING
            seq.last_run = now
            chosen.add(id(seq))
            seats -= 1
            budget -= n
            batch.add(seq, n)
        self.num_pauses += sum(
            1 for s in order if id(s) in self._chosen and id(s) not in chosen and s.status is Status.RUNNING
        )
        self._chosen = chosen
        return batch

    def proactive(self) -> None:
        """After the batch is launched: swap in the most urgent swapped-out jobs while blocks are
        plentiful, and swap out the least urgent paused jobs when they run short."""
        if self.swapper is None:
            return
        order, chosen = self._order, self._chosen
        low = max(1, int(self.cfg.low_watermark * self.blocks.num_blocks))
        high = int(self.cfg.high_watermark * self.blocks.num_blocks)
        for seq in order:
            if seq.status is Status.SWAPPED and not seq.finished:
                if self.blocks.num_free - seq.swapped_blocks < high:
                    break
                self._swap_in(seq)
        for seq in reversed(order):
            if self.blocks.num_free >= low:
                break
            if (
                seq.status is Status.RUNNING
                and id(seq) not in chosen
                and seq.block_table
                and self.swapper.can_hold(len(seq.block_table))
            ):
                self._evict(seq)

    def fence(self) -> None:
        if self.swapper is not None:
            self.swapper.fence()

    def finish(self, seq: Sequence) -> None:
        if seq in self.jobs:
            self.jobs.remove(seq)
        if seq.status is Status.SWAPPED and self.swapper is not None:
            self.swapper.drop(seq.swap_buffer)
            seq.swap_buffer = None
            seq.swapped_blocks = 0
        self._free(seq)
        seq.status = Status.FINISHED

    def state(self) -> dict:
        return {
            "queue_lengths": self.queue_lengths(),
            "swapped": len(self.swapped),
            "host_blocks_used": self.swapper.host_blocks_used if self.swapper else 0,
            "host_blocks_total": self.swapper.num_host_blocks if self.swapper else 0,
            "preemptions": self.num_preemptions,
            "swap_outs": self.num_swap_outs,
            "swap_ins": self.num_swap_ins,
            "recomputes": self.num_recomputes,
            "promotions": self.num_promotions,
            "seniors": self.num_seniors,
            "pauses": self.num_pauses,
            "quanta_s": self.quanta,
        }
