"""Chooses each iteration's batch.

Every step runs the admitted sequences that fit: one token for each decoding sequence, a chunk of the
prompt for each prefilling one, all within a token budget and a cap on sequences. New requests are
admitted only when their KV blocks are free, so the batch size follows free memory. When blocks run
out mid-decode the least urgent running sequence is preempted: its blocks are freed and it goes back
to the waiting queue to be recomputed later (its prompt blocks often come back from the prefix cache).

The policy is the order of urgency. FCFS: (priority, arrival). A second policy implements
`Policy` and changes only that order and when it is re-evaluated.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from python_backend.engine.kv_cache import BlockManager
from python_backend.engine.sequence import Sequence, Status


class Policy:
    """FCFS: lower priority value first, then earlier arrival. Running jobs are never displaced by
    waiting ones (run to completion, as Orca and vLLM do); only memory pressure preempts."""

    name = "fcfs"

    def key(self, seq: Sequence) -> tuple:
        return (seq.priority, seq.arrival_index)


@dataclass
class ScheduledBatch:
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # sequence, tokens this step
    preempted: list[Sequence] = field(default_factory=list)

    def add(self, seq: Sequence, n: int) -> None:
        """One token of a decoding sequence is a decode; anything else (prompt, recompute) a prefill."""
        if seq.in_prefill or n > 1:
            self.prefills.append((seq, n))
        else:
            self.decodes.append(seq)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        policy: Policy | None = None,
        watermark: float = 0.01,
    ):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy or Policy()
        self.waiting: list[Sequence] = []  # sorted by policy key
        self.running: list[Sequence] = []  # sorted by policy key
        self.watermark_blocks = max(1, int(watermark * blocks.num_blocks))
        self.num_preemptions = 0
        self.prefix_hit_tokens = 0  # prompt tokens admitted with their K/V already cached

    def _insort(self, queue: list[Sequence], seq: Sequence) -> None:
        bisect.insort(queue, seq, key=self.policy.key)

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self._insort(self.waiting, seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def _free(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed = 0
        seq.runner_kv = None

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        """Recompute later: drop the KV blocks, keep the tokens made so far."""
        self.running.remove(seq)
        self._free(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)
        batch.preempted.append(seq)

    def _take_cached_prefix(self, seq: Sequence) -> None:
        """A sequence without blocks starts from the cached blocks of its longest computed prefix."""
        cached, hashes = self.blocks.match_prefix(seq.all_ids, seq.num_tokens - 1)
        seq.block_table, seq.block_hashes = cached, hashes
        seq.num_computed = len(cached) * self.blocks.block_size
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = seq.num_computed

    def _grow(self, seq: Sequence, num_new: int) -> bool:
        """Give `seq` the blocks for `num_new` more computed tokens; False when they are not free."""
        need = self.blocks.blocks_for(seq.num_computed + num_new) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.blocks.num_free:
            return False
        seq.block_table.extend(self.blocks.allocate(need))
        return True

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        seats = self.max_num_seqs
        for seq in list(self.running):
            if seq not in self.running:  # preempted while making room for an earlier one
                continue
            if seats == 0 or budget == 0:
                break
            n = min(seq.num_uncomputed, budget)
            while not self._grow(seq, n):
                victim = self.running[-1]  # least urgent
                self._preempt(victim, batch)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            seats -= 1
            budget -= n
            batch.add(seq, n)
        if batch.preempted:
            return batch  # memory is short: admit nothing new this step
        while self.waiting and seats > 0 and budget > 0:
            seq = self.waiting[0]
            if not seq.block_table and self.blocks.enable_prefix_caching:
                self._take_cached_prefix(seq)
            n = min(seq.num_uncomputed, budget)
            need = self.blocks.blocks_for(seq.num_computed + n) - len(seq.block_table)
            if need + self.watermark_blocks > self.blocks.num_free and self.running:
                self._free(seq)  # give back the prefix blocks; try again next step
                break
            if not self._grow(seq, n):
                self._free(seq)
                break
            self.waiting.pop(0)
            self.prefix_hit_tokens += len(seq.block_hashes) * self.blocks.block_size
            seq.status = Status.RUNNING
            self._insort(self.running, seq)
            seats -= 1
            budget -= n
            batch.prefills.append((seq, n))
        return batch

    def after_step(self, batch: ScheduledBatch) -> None:
        """Count the tokens just computed and make newly full blocks findable by their prefix."""
        bs = self.blocks.block_size
        for seq, n in [(s, 1) for s in batch.decodes] + batch.prefills:
            seq.num_computed += n
            ids = None
            while (len(seq.block_hashes) + 1) * bs <= seq.num_computed:
                ids = ids or seq.all_ids
                i = len(seq.block_hashes)
                parent = seq.block_hashes[-1] if seq.block_hashes else 0
                tokens = ids[i * bs : (i + 1) * bs]
                h = self.blocks.chain_hash(parent, tokens)
                self.blocks.register(seq.block_table[i], h, tokens, parent)
                seq.block_hashes.append(h)

    def reserve_next(self, seqs: list[Sequence]) -> bool:
        """Blocks for one more token of each sequence, for a step run ahead of the next schedule()
        (Engine.run_ahead); False, and nothing taken, when they are not all free."""
        need = sum(max(0, self.blocks.blocks_for(s.num_computed + 1) - len(s.block_table)) for s in seqs)
        if need > self.blocks.num_free:
            return False
        for seq in seqs:
            self._grow(seq, 1)
        return True

    # hooks the MLFQ scheduler (mlfq.py) fills in; FCFS needs none of them
    def fence(self) -> None:
        """Before the forward pass: wait for KV copies the batch depends on."""

    def proactive(self) -> None:
        """After the forward pass is launched: memory work that can overlap with it."""

    def charge(self, batch: ScheduledBatch, seconds: float) -> None:
        """The iteration's jobs used `seconds` of service."""

    def state(self) -> dict:
        return {
            "queue_lengths": [len(self.waiting) + len(self.running)],
            "swapped": 0,
            "host_blocks_used": 0,
            "host_blocks_total": 0,
            "preemptions": self.num_preemptions,
            "swap_outs": 0,
            "swap_ins": 0,
            "recomputes": self.num_preemptions,
            "promotions": 0,
        }

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence wherever it is and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)
        seq.status = Status.FINISHED
