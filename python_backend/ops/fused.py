"""Fused elementwise kernels in Triton: residual add + RMSNorm, and SiLU-and-multiply.

Each replaces several PyTorch kernels (and their round trips through memory) with one. Rounding
follows the PyTorch definitions in models/llama.py step for step (the residual sum, the normalised
value and the SiLU are rounded to the model's dtype where PyTorch rounds them), so the fused model
stays token-for-token comparable with transformers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from python_backend.ops import pdl
from python_backend.ops.pdl import wait_for_previous
from python_backend.ops.rounding import rounded


@triton.jit
def _add_rms_norm_kernel(
    X,
    RES,
    W,
    OUT,
    RES_OUT,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    n,
    eps,
    BLOCK: tl.constexpr,
    HAS_RES: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(RES + row * stride_r + cols, mask=mask, other=0.0)
        xf = rounded(x.to(tl.float32) + r.to(tl.float32), X.dtype.element_ty)
        tl.store(RES_OUT + row * stride_ro + cols, xf.to(X.dtype.element_ty), mask=mask)
    else:
        xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n + eps)
    y = rounded(xf * rstd, X.dtype.element_ty)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, (y * w).to(OUT.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """[T, N] -> [T, N], as llama.rms_norm."""
    out = torch.empty_like(x)
    if x.shape[0]:
        _add_rms_norm_kernel[(x.shape[0],)](
            x,
            x,
            weight,
            out,
            out,
            x.stride(0),
            0,
            out.stride(0),
            0,
            x.shape[1],
            eps,
            BLOCK=triton.next_power_of_2(x.shape[1]),
            HAS_RES=False,
            PDL=False,
            num_warps=4,
        )
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual): the residual stream's update and the next norm in one pass."""
    out = torch.empty_like(x)
    res_out = torch.empty_like(x)
    use_pdl = pdl.enabled(x.device)
    if x.shape[0]:
        _add_rms_norm_kernel[(x.shape[0],)](
            x,
            residual,
            weight,
            out,
            res_out,
            x.stride(0),
            residual.stride(0),
            out.stride(0),
            res_out.stride(0),
            x.shape[1],
            eps,
            BLOCK=triton.next_power_of_2(x.shape[1]),
            HAS_RES=True,
            PDL=use_pdl,
            num_warps=4,
            **pdl.launch(use_pdl),
        )
    return out, res_out


@triton.jit
def _silu_mul_kernel(X, OUT, stride_x, stride_o, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + n + cols, mask=mask, other=0.0).to(tl.float32)
    act = rounded(gate / (1.0 + tl.exp(-gate)), OUT.dtype.element_ty)
    tl.store(OUT + row * stride_o + cols, (act * up).to(OUT.dtype.element_ty), mask=mask)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2N] (gate, up side by side) -> silu(gate) * up [T, N]."""
    t, n2 = x.shape
    n = n2 // 2
    out = torch.empty(t, n, dtype=x.dtype, device=x.device)
    if t:
        block = 1024
        _silu_mul_kernel[(t, triton.cdiv(n, block))](x, out, x.stride(0), out.stride(0), n, BLOCK=block, num_warps=4)
    return out
