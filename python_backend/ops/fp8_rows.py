"""Activations to E4M3 for FP8 products, one Triton kernel per product (GPU; also runs in Triton's
interpreter where the interpreter knows float8).

FP8's scaled matrix product needs its activations rounded to E4M3 with a scale per row. Written as
PyTorch operations (absolute value, row maximum, divide, clamp, cast, padding) that is six or more
kernels and as many passes over the activations before every product, which at decode batch sizes
cost more than the FP8 product saves. Here one program per row finds the row's maximum and writes
the codes and the scale; rows past the input's, which pad the GEMM to a multiple of 16 rows, get
zeros and scale 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROW_MULTIPLE = 16  # the FP8 GEMM takes rows in multiples of this
E4M3_MAX = 448.0


@triton.jit
def _fp8_rows_kernel(X, Q, S, n_rows, n_cols, stride_x, stride_q, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_K)
    live = row < n_rows
    k_live = tl.where(live, n_cols, 0)  # a padding row reads nothing
    x_row = X + row.to(tl.int64) * stride_x
    q_row = Q + row.to(tl.int64) * stride_q
    if ONE_PASS:  # the whole row in registers: read it once
        x = tl.load(x_row + cols, mask=cols < k_live, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), 0)
        scale = tl.where(live, tl.maximum(amax, 1e-12) / 448.0, 1.0)
        q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
        tl.store(q_row + cols, q.to(tl.float8e4nv), mask=cols < n_cols)
    else:
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k in range(0, n_cols, BLOCK_K):
            x = tl.load(x_row + k + cols, mask=k + cols < k_live, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.where(live, tl.maximum(tl.max(amax, 0), 1e-12) / 448.0, 1.0)
        for k in range(0, n_cols, BLOCK_K):
            x = tl.load(x_row + k + cols, mask=k + cols < k_live, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
            tl.store(q_row + k + cols, q.to(tl.float8e4nv), mask=k + cols < n_cols)
    tl.store(S + row, scale)


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (codes float8_e4m3fn [M', K], scales float32 [M', 1]) with M' = M rounded up to a
    multiple of 16; x[i] ≈ codes[i] * scales[i], and the padding rows are zero."""
    m, k = x.shape
    padded = -(-m // ROW_MULTIPLE) * ROW_MULTIPLE
    codes = torch.empty(padded, k, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(padded, 1, dtype=torch.float32, device=x.device)
    one_pass = k <= 8192
    block = triton.next_power_of_2(k) if one_pass else 2048
    x = x if x.stride(-1) == 1 else x.contiguous()
    _fp8_rows_kernel[(padded,)](
        x,
        codes,
        scales,
        m,
        k,
        x.stride(0),
        codes.stride(0),
        BLOCK_K=block,
        ONE_PASS=one_pass,
        num_warps=4 if block <= 2048 else 8,
    )
    return codes, scales
