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


def _bucket(n: int, smallest: int = 1) -> int:
    size = smallest
    while size < n:
        size *= 2
    return size


class DecodeGraphs:
    """The decode step as CUDA graphs, one per (padded batch, padded block-table width), captured on
    first use. A graph replays the whole forward pass with one launch, so a step costs GPU time
    rather than Python and kernel-launch time: that is what small batches are short of. Large batches
    are GPU-bound and stay eager, where the exact table width costs less than a padded one. Padding rows read and write a scratch block that the
    block manager never hands out; their logits are dropped."""

    def __init__(self, model: LlamaModel, pool: KVPool, scratch_block: int, max_batch: int):
        self.model, self.pool, self.scratch, self.max_batch = model, pool, scratch_block, max_batch
        self.block_size = pool.block_size
        self.graphs: dict[tuple[int, int], dict] = {}
        self.mempool = torch.cuda.graph_pool_handle()

    def _step(self, g: dict) -> torch.Tensor:
        bs, dev = self.block_size, self.model.device
        key_pos = torch.arange(g["tables"].shape[1] * bs, device=dev)
        mask = torch.where(key_pos[None, :] < g["lengths"][:, None], 0.0, float("-inf")).to(self.model.dtype)
        meta = AttentionMetadata(slot_mapping=g["slots"], num_decode=g["ids"].shape[0],
                                 decode_block_tables=g["tables"], decode_mask=mask[:, None, None, :])
        return self.model.forward(g["ids"], g["positions"], meta, self.pool.k, self.pool.v, g["rows"])

    def _capture(self, batch: int, width: int) -> dict:
        dev = self.model.device
        g = {"ids": torch.zeros(batch, dtype=torch.long, device=dev),
             "positions": torch.zeros(batch, dtype=torch.long, device=dev),
             "slots": torch.full((batch,), self.scratch * self.block_size, dtype=torch.long, device=dev),
             "tables": torch.full((batch, width), self.scratch, dtype=torch.long, device=dev),
             "lengths": torch.ones(batch, dtype=torch.long, device=dev),
             "rows": torch.arange(batch, device=dev)}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # let lazy initialisation happen outside the capture
                self._step(g)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            g["logits"] = self._step(g)
        g["graph"] = graph
        return g

    def run(self, ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
            lengths: list[int]) -> torch.Tensor:
        n = len(ids)
        batch = _bucket(n)
        width = -(-max(len(t) for t in tables) // 8) * 8  # whole multiples of 8 blocks: little padding to gather
        g = self.graphs.get((batch, width))
        if g is None:
            g = self.graphs[(batch, width)] = self._capture(batch, width)
        pad = batch - n
        host = torch.tensor([ids + [0] * pad, positions + [0] * pad, slots + [self.scratch * self.block_size] * pad,
                             lengths + [1] * pad], dtype=torch.long)
        g["ids"].copy_(host[0], non_blocking=True)
        g["positions"].copy_(host[1], non_blocking=True)
        g["slots"].copy_(host[2], non_blocking=True)
        g["lengths"].copy_(host[3], non_blocking=True)
        rows = [t + [self.scratch] * (width - len(t)) for t in tables] + [[self.scratch] * width] * pad
        g["tables"].copy_(torch.tensor(rows, dtype=torch.long), non_blocking=True)
        g["graph"].replay()
        return g["logits"][:n]


class Runner:
    def __init__(self, model: LlamaModel, pool: KVPool, graphs: DecodeGraphs | None = None):
        self.model = model
        self.pool = pool
        self.device = model.device
        self.block_size = pool.block_size
        self.graphs = graphs

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
        g = self.graphs
        if g is not None and not batch.prefills and 0 < len(batch.decodes) <= g.max_batch:
            bs = self.block_size
            seqs = batch.decodes
            pos = [s.num_computed for s in seqs]
            logits = g.run([s.token_at(p) for s, p in zip(seqs, pos)], pos,
                           [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, pos)],
                           [s.block_table for s in seqs], [p + 1 for p in pos])
            return logits, list(seqs)
        input_ids, positions, meta, rows, sampled = self.prepare(batch)
        logits = self.model.forward(input_ids, positions, meta, self.pool.k, self.pool.v, rows)
        return (logits if sampled else None), sampled
