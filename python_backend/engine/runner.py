"""Turns a scheduled batch into the model's flat inputs and runs one step.

Decode tokens come first (one row each), then each prefill chunk's tokens. Logits are computed only
for the rows that make a token this step: every decode row and the last row of each prefill that
finishes its prompt. The sequences those rows belong to are returned alongside, in row order.
"""
from __future__ import annotations

import torch

from python_backend.engine.kv_cache import KVPool
from python_backend.engine.scheduler import ScheduledBatch
from python_backend.engine.sequence import Sequence
from python_backend.models.llama import LlamaModel
from python_backend.ops.attention import AttentionMetadata, PrefillSeq


class Runner:
    def __init__(self, model: LlamaModel, pool: KVPool):
        self.model = model
        self.pool = pool
        self.device = model.device
        self.block_size = pool.block_size

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor,
                                                       list[Sequence]]:
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        rows: list[int] = []
        sampled: list[Sequence] = []
        tables: list[list[int]] = []
        lengths: list[int] = []
        for seq in batch.decodes:
            pos = seq.num_computed
            ids.append(seq.token_at(pos))
            positions.append(pos)
            slots.append(seq.block_table[pos // bs] * bs + pos % bs)
            rows.append(len(rows))
            sampled.append(seq)
            tables.append(seq.block_table)
            lengths.append(pos + 1)
        meta = AttentionMetadata(slot_mapping=torch.empty(0), num_decode=len(batch.decodes))
        if tables:
            width = max(len(t) for t in tables)
            padded = [t + [0] * (width - len(t)) for t in tables]
            meta.decode_block_tables = self._tensor(padded)
            key_pos = torch.arange(width * bs, device=self.device)
            visible = key_pos[None, :] < self._tensor(lengths)[:, None]
            zero = torch.zeros((), dtype=self.model.dtype, device=self.device)
            ninf = torch.full((), float("-inf"), dtype=self.model.dtype, device=self.device)
            meta.decode_mask = torch.where(visible, zero, ninf)[:, None, None, :]
        for seq, n in batch.prefills:
            start = len(ids)
            first = seq.num_computed
            all_ids = seq.all_ids
            ids.extend(all_ids[first:first + n])
            table = seq.block_table
            for pos in range(first, first + n):
                positions.append(pos)
                slots.append(table[pos // bs] * bs + pos % bs)
            meta.prefills.append(PrefillSeq(start=start, q_len=n, context_len=first + n,
                                            block_table=self._tensor(table)))
            if first + n == seq.num_tokens:
                rows.append(start + n - 1)
                sampled.append(seq)
        meta.slot_mapping = self._tensor(slots)
        return self._tensor(ids), self._tensor(positions), meta, self._tensor(rows), sampled

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor | None, list[Sequence]]:
        """One model step; logits [len(sampled), vocab] for the sequences that make a token."""
        input_ids, positions, meta, rows, sampled = self.prepare(batch)
        logits = self.model.forward(input_ids, positions, meta, self.pool.k, self.pool.v, rows)
        return (logits if sampled else None), sampled
