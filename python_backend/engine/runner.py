"""Turns a scheduled batch into the model's flat inputs and runs one step.

Decode tokens come first (one row each), then each prefill chunk's tokens. Logits are computed only
for the rows that make a token this step: every decode row and the last row of each prefill that
finishes its prompt. The sequences those rows belong to are returned alongside, in row order.
"""

from __future__ import annotations

import numpy as np
import torch

from python_backend.engine.kv_cache import KVPool
from python_backend.engine.scheduler import ScheduledBatch
from python_backend.engine.sequence import Sequence
from python_backend.models.llama import LlamaModel
from python_backend.ops.attention import AttentionMetadata, PrefillSeq

GRAPH_BATCHES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def graph_batch(n: int) -> int:
    """The captured batch size a decode batch of n rows pads to: the next rung of the ladder."""
    for size in GRAPH_BATCHES:
        if size >= n:
            return size
    return n


class DecodeGraphs:
    """The decode step as CUDA graphs, one per (padded batch, padded block-table width), all captured
    at start-up (capture_all; on first use where that is turned off). A graph replays the whole forward
    pass with one launch, so a step costs GPU time
    rather than Python and kernel-launch time. The batch pads to the next rung of GRAPH_BATCHES; the
    table width to a multiple of `width_step` blocks (the Triton decode kernel reads only a sequence's
    own blocks, so with it the width costs nothing and few widths are needed). Padding rows read and
    write a scratch block that the block manager never hands out; their logits are dropped. Per-step
    inputs go through pinned host buffers into the graph's static tensors in one copy each."""

    def __init__(self, model: LlamaModel, pool: KVPool, scratch_block: int, max_batch: int):
        self.model, self.pool, self.scratch, self.max_batch = model, pool, scratch_block, max_batch
        self.block_size = pool.block_size
        self.kernels = model.kernels
        self.width_step = 32 if self.kernels else 8
        self.num_sms = torch.cuda.get_device_properties(model.device).multi_processor_count
        self.graphs: dict[tuple[int, int], dict] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.mempool = torch.cuda.graph_pool_handle()

    def _step(self, g: dict, out: torch.Tensor | None = None) -> torch.Tensor:
        bs, dev = self.block_size, self.model.device
        batch = g["ids"].shape[0]
        if self.kernels:
            meta = AttentionMetadata(
                slot_mapping=g["slots"],
                num_decode=batch,
                decode_block_tables=g["tables"],
                decode_seq_lens=g["lengths"],
                num_splits=g["splits"],
            )
        else:
            key_pos = torch.arange(g["tables"].shape[1] * bs, device=dev)
            mask = torch.where(key_pos[None, :] < g["lengths"][:, None], 0.0, float("-inf")).to(self.model.dtype)
            meta = AttentionMetadata(
                slot_mapping=g["slots"],
                num_decode=batch,
                decode_block_tables=g["tables"],
                decode_mask=mask[:, None, None, :],
            )
        return self.model.forward(g["ids"], g["positions"], meta, self.pool.k, self.pool.v, None, out)

    def _capture(self, batch: int, width: int) -> dict:
        dev = self.model.device
        vec = torch.zeros(4, batch, dtype=torch.long, device=dev)  # ids, positions, slots, lengths
        vec[2] = self.scratch * self.block_size
        vec[3] = 1
        g = {
            "vec": vec,
            "ids": vec[0],
            "positions": vec[1],
            "slots": vec[2],
            "lengths": vec[3],
            "tables": torch.full((batch, width), self.scratch, dtype=torch.long, device=dev),
            "splits": ta_num_splits(batch, self.model.cfg.num_kv_heads, self.num_sms) if self.kernels else 1,
            # two sets of pinned inputs, used in turn: a step run ahead (Engine.run_ahead) fills one while
            # the other may still be waiting to be copied for the step before it
            "host": [
                (
                    torch.empty(4, batch, dtype=torch.long).pin_memory(),
                    torch.empty(batch, width, dtype=torch.long).pin_memory(),
                )
                for _ in range(2)
            ],
            "turn": 0,
        }
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # let lazy initialisation (and Triton's compilation) happen outside the capture
                self._step(g)
        torch.cuda.current_stream().wait_stream(side)
        if batch not in self.outputs:  # one per batch size, outside the graphs' pool, shared by all widths
            self.outputs[batch] = torch.empty(batch, self.model.cfg.vocab_size, dtype=torch.float32, device=dev)
        g["logits"] = self.outputs[batch]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            self._step(g, out=g["logits"])
        g["graph"] = graph
        return g

    def capture_all(self, max_batch: int, max_blocks: int) -> int:
        """Capture every graph a decode step can need, largest batch first so that the smaller ones
        reuse its memory. Captured lazily instead, a batch size or table width first met while
        serving would stall that step by the capture (tens of milliseconds each), and under load
        such stalls delay first tokens several-fold. Returns the number captured."""
        widths = range(self.width_step, -(-max_blocks // self.width_step) * self.width_step + 1, self.width_step)
        batches = [b for b in GRAPH_BATCHES if b <= graph_batch(min(max_batch, self.max_batch))]
        for batch in sorted(batches, reverse=True):
            for width in widths:
                if (batch, width) not in self.graphs:
                    self.graphs[(batch, width)] = self._capture(batch, width)
        torch.cuda.synchronize(self.model.device)
        return len(self.graphs)

    def run(
        self,
        ids: list[int] | torch.Tensor,
        positions: list[int],
        slots: list[int],
        tables: list[list[int]],
        lengths: list[int],
    ) -> torch.Tensor:
        """One decode step; `ids` may be a device tensor (the tokens of a step not yet read back)."""
        n = len(positions)
        batch = graph_batch(n)
        step = self.width_step
        width = -(-max(len(t) for t in tables) // step) * step
        g = self.graphs.get((batch, width))
        if g is None:
            g = self.graphs[(batch, width)] = self._capture(batch, width)
        # this set's last copies were for the step before the previous one, whose tokens have been read
        host_vec, host_tables = g["host"][g["turn"]]
        g["turn"] ^= 1
        vec = host_vec.numpy()
        vec[0, :n] = 0 if isinstance(ids, torch.Tensor) else ids
        vec[1, :n], vec[2, :n], vec[3, :n] = positions, slots, lengths
        vec[0, n:], vec[1, n:], vec[2, n:], vec[3, n:] = 0, 0, self.scratch * self.block_size, 1
        tab = host_tables.numpy()
        tab.fill(self.scratch)
        for i, t in enumerate(tables):
            tab[i, : len(t)] = t
        g["vec"].copy_(host_vec, non_blocking=True)
        g["tables"].copy_(host_tables, non_blocking=True)
        if isinstance(ids, torch.Tensor):
            g["ids"][:n].copy_(ids)
        g["graph"].replay()
        return g["logits"][:n]


def _aligned(parts: list[np.ndarray], sizes: list[int]) -> list[np.ndarray]:
    """The parts, each input padded to an even length, so that every tensor split from them starts
    16 bytes aligned. Triton compiles a kernel variant per pointer alignment: with inputs at odd
    offsets, new alignments would keep turning up while serving, each costing a compile (about a
    second)."""
    out, i = [], 0
    for n in sizes:
        taken = 0
        while taken < n:
            out.append(parts[i])
            taken += len(parts[i])
            i += 1
        if n % 2:
            out.append(np.zeros(1, dtype=np.int64))
    return out


def ta_num_splits(batch: int, num_kv_heads: int, num_sms: int, max_len: int | None = None) -> int:
    from python_backend.ops.triton_attention import num_splits_for

    return num_splits_for(batch, num_kv_heads, max_len, num_sms)


class Runner:
    def __init__(self, model: LlamaModel, pool: KVPool, graphs: DecodeGraphs | None = None):
        self.model = model
        self.pool = pool
        self.device = model.device
        self.block_size = pool.block_size
        self.graphs = graphs
        self.num_sms = (
            torch.cuda.get_device_properties(self.device).multi_processor_count if self.device.type == "cuda" else 1
        )

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

    def prepare(
        self, batch: ScheduledBatch
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor, list[Sequence]]:
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
            ids.append(seq.token_at(pos) if pos < seq.num_tokens else 0)  # else: a step run ahead fills it
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
            ids.extend(all_ids[first : first + n])
            table = seq.block_table
            for pos in range(first, first + n):
                positions.append(pos)
                slots.append(table[pos // bs] * bs + pos % bs)
            meta.prefills.append(
                PrefillSeq(start=start, q_len=n, context_len=first + n, block_table=self._tensor(table))
            )
            if first + n == seq.num_tokens:
                rows.append(start + n - 1)
                sampled.append(seq)
        meta.slot_mapping = self._tensor(slots)
        return self._tensor(ids), self._tensor(positions), meta, self._tensor(rows), sampled

    def prepare_kernels(
        self, batch: ScheduledBatch
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor, list[Sequence]]:
        """The Triton kernels' inputs, built with numpy and sent to the device in one copy."""
        bs = self.block_size
        decodes = batch.decodes
        nd = len(decodes)
        pos_d = [s.num_computed for s in decodes]
        ids = [s.token_at(p) if p < s.num_tokens else 0 for s, p in zip(decodes, pos_d)]  # 0: filled by run()
        slots_d = [s.block_table[p // bs] * bs + p % bs for s, p in zip(decodes, pos_d)]
        sampled = list(decodes)
        rows = list(range(nd))
        ids_p, pos_p, slots_p, cu, ctx = [], [], [], [0], []
        for seq, n in batch.prefills:
            first = seq.num_computed
            ids_p.append(np.asarray(seq.all_ids[first : first + n], dtype=np.int64))
            pos = np.arange(first, first + n, dtype=np.int64)
            pos_p.append(pos)
            slots_p.append(np.asarray(seq.block_table, dtype=np.int64)[pos // bs] * bs + pos % bs)
            cu.append(cu[-1] + n)
            ctx.append(first + n)
            if first + n == seq.num_tokens:
                rows.append(nd + cu[-1] - 1)
                sampled.append(seq)
        t = nd + cu[-1]
        wd = max((len(s.block_table) for s in decodes), default=0)
        wp = max((len(s.block_table) for s, _ in batch.prefills), default=0)
        dec_tab = np.zeros((nd, wd), dtype=np.int64)
        for i, s in enumerate(decodes):
            dec_tab[i, : len(s.block_table)] = s.block_table
        pre_tab = np.zeros((len(batch.prefills), wp), dtype=np.int64)
        for i, (s, _) in enumerate(batch.prefills):
            pre_tab[i, : len(s.block_table)] = s.block_table
        parts = [
            np.asarray(ids, dtype=np.int64),
            *ids_p,
            np.asarray(pos_d, dtype=np.int64),
            *pos_p,
            np.asarray(slots_d, dtype=np.int64),
            *slots_p,
            np.asarray(rows, dtype=np.int64),
            np.asarray([p + 1 for p in pos_d], dtype=np.int64),
            np.asarray(cu, dtype=np.int64),
            np.asarray(ctx, dtype=np.int64),
            dec_tab.ravel(),
            pre_tab.ravel(),
        ]
        sizes = [t, t, t, len(rows), nd, len(cu), len(ctx), dec_tab.size, pre_tab.size]
        flat = torch.from_numpy(np.concatenate(_aligned(parts, sizes))).to(self.device, non_blocking=True)
        input_ids, positions, slots, rows_t, lens, cu_t, ctx_t, dtab, ptab = (
            chunk[:n] for chunk, n in zip(flat.split([n + n % 2 for n in sizes]), sizes)
        )
        meta = AttentionMetadata(
            slot_mapping=slots,
            num_decode=nd,
            decode_block_tables=dtab.view(nd, wd),
            decode_seq_lens=lens,
            prefill_cu_q=cu_t,
            prefill_context_lens=ctx_t,
            prefill_block_tables=ptab.view(len(batch.prefills), wp),
            prefill_max_q=max((n for _, n in batch.prefills), default=0),
        )
        if nd:
            meta.num_splits = ta_num_splits(nd, self.model.cfg.num_kv_heads, self.num_sms, max(pos_d) + 1)
        return input_ids, positions, meta, rows_t, sampled

    @torch.inference_mode()
    def prompt_logits(self, seq: Sequence) -> torch.Tensor:
        """float32 logits at every position of a sequence's tokens, in one prefill (its blocks
        allocated by the caller): what perplexity and teacher-forced agreement read."""
        prepare = self.prepare_kernels if self.model.kernels else self.prepare
        input_ids, positions, meta, _, _ = prepare(ScheduledBatch(prefills=[(seq, seq.num_tokens)]))
        rows = torch.arange(seq.num_tokens, device=self.device)
        return self.model.forward(input_ids, positions, meta, self.pool.k, self.pool.v, rows)

    @torch.inference_mode()
    def run(
        self, batch: ScheduledBatch, decode_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, list[Sequence]]:
        """One model step; logits [len(sampled), vocab] for the sequences that make a token. With
        `decode_ids` (a device tensor, one per decode), the decodes' input tokens are taken from it:
        a step run ahead, before the previous step's tokens have reached the host."""
        g = self.graphs
        if g is not None and not batch.prefills and 0 < len(batch.decodes) <= g.max_batch:
            bs = self.block_size
            seqs = batch.decodes
            pos = [s.num_computed for s in seqs]
            ids = decode_ids if decode_ids is not None else [s.token_at(p) for s, p in zip(seqs, pos)]
            logits = g.run(
                ids,
                pos,
                [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, pos)],
                [s.block_table for s in seqs],
                [p + 1 for p in pos],
            )
            return logits, list(seqs)
        prepare = self.prepare_kernels if self.model.kernels else self.prepare
        input_ids, positions, meta, rows, sampled = prepare(batch)
        if decode_ids is not None:
            input_ids[: len(batch.decodes)] = decode_ids
        logits = self.model.forward(input_ids, positions, meta, self.pool.k, self.pool.v, rows)
        return (logits if sampled else None), sampled
