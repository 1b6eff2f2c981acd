"""The runner's flat kernel inputs: every tensor starts 16 bytes aligned, whatever the batch's sizes,
so Triton never meets a new pointer alignment (and compiles a new kernel variant) while serving."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from python_backend.engine.runner import Runner
from python_backend.engine.scheduler import ScheduledBatch
from python_backend.engine.sequence import SamplingParams, Sequence


def _seq(i: int, prompt: int, computed: int, block_size: int) -> Sequence:
    seq = Sequence(
        request_id=f"s{i}", prompt_ids=[100 + i * 7 + j for j in range(prompt)], params=SamplingParams(max_tokens=4)
    )
    seq.num_computed = computed
    seq.block_table = [10 * i + b for b in range(-(-(prompt + 1) // block_size))]
    return seq


def test_kernel_inputs_are_aligned_and_hold_the_batch():
    bs = 4
    runner = Runner.__new__(Runner)  # only prepare_kernels' inputs: no model weights needed
    runner.block_size, runner.device, runner.num_sms = bs, torch.device("cpu"), 8
    runner.model = SimpleNamespace(cfg=SimpleNamespace(num_kv_heads=2))
    for nd, chunks in [(3, (5, 7)), (1, (1,)), (2, ()), (0, (3, 9, 1)), (5, (2, 2))]:
        batch = ScheduledBatch()
        for i in range(nd):  # decodes: prompt done, one token each
            seq = _seq(i, 6 + i, 6 + i, bs)
            seq.output_ids.append(42)
            batch.decodes.append(seq)
        for j, n in enumerate(chunks):
            batch.prefills.append((_seq(nd + j, 12, 3, bs), n))
        ids, positions, meta, rows, sampled = runner.prepare_kernels(batch)
        tensors = [
            ids,
            positions,
            rows,
            meta.slot_mapping,
            meta.decode_seq_lens,
            meta.prefill_cu_q,
            meta.prefill_context_lens,
            meta.decode_block_tables,
            meta.prefill_block_tables,
        ]
        assert all(t.data_ptr() % 16 == 0 for t in tensors), (nd, chunks)
        want_ids = [s.token_at(s.num_computed) for s in batch.decodes]
        for s, n in batch.prefills:
            want_ids += s.all_ids[s.num_computed : s.num_computed + n]
        assert ids.tolist() == want_ids
        assert meta.prefill_cu_q.tolist() == [0, *[sum(chunks[: k + 1]) for k in range(len(chunks))]]
        assert meta.decode_seq_lens.tolist() == [s.num_computed + 1 for s in batch.decodes]
        assert meta.decode_block_tables.shape[0] == nd and meta.prefill_block_tables.shape[0] == len(chunks)
