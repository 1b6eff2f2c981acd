"""Greedy token choice on the GPU as two small Triton kernels (also runs in Triton's interpreter).

PyTorch's max over one row of a large vocabulary's logits runs as a single reduction with too few
blocks to fill the GPU, a visible share of a one-sequence decode step. Here many programs each reduce
a chunk of a row, and one program per row picks the best chunk. Ties go to the lowest index, as
torch.argmax does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 2048


@triton.jit
def _chunk_max_kernel(X, VAL, IDX, N, stride_x, num_chunks, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1)
    cols = c * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + row.to(tl.int64) * stride_x + cols, mask=cols < N, other=float("-inf")).to(tl.float32)
    best, at = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(VAL + row * num_chunks + c, best)
    tl.store(IDX + row * num_chunks + c, c * BLOCK + at)


@triton.jit
def _pick_chunk_kernel(VAL, IDX, OUT, num_chunks, C_PAD: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, C_PAD)
    v = tl.load(VAL + row * num_chunks + c, mask=c < num_chunks, other=float("-inf"))
    _, j = tl.max(v, 0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(OUT + row, tl.load(IDX + row * num_chunks + j))


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> int64 [B]: each row's first maximal index."""
    b, v = logits.shape
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    if b == 0:
        return out
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    chunks = triton.cdiv(v, CHUNK)
    vals = torch.empty(b, chunks, dtype=torch.float32, device=logits.device)
    idx = torch.empty(b, chunks, dtype=torch.int64, device=logits.device)
    _chunk_max_kernel[(b, chunks)](logits, vals, idx, v, logits.stride(0), chunks, BLOCK=CHUNK, num_warps=4)
    _pick_chunk_kernel[(b,)](vals, idx, out, chunks, C_PAD=triton.next_power_of_2(chunks), num_warps=1)
    return out
