"""A decode step's attention input in one kernel: residual add, RMSNorm, the fused QKV product,
rotary embedding and the KV-cache write (GPU; also runs in Triton's interpreter).

A single sequence's decode step is some 150 short kernels, and each costs its launch and its ramp
as well as its work: at one row the add + RMSNorm and the rotary and KV write, though tiny in work,
together cost over half as much as the QKV product itself. This kernel does the three in one launch
per layer for batches of up to four rows.

Every program recomputes the normalised input rows from the previous layer's output and the
residual stream (a few KiB, from L2) instead of waiting for another kernel to write them; program 0
also stores the new residual rows. A program owns pairs of output features (i, i + D/2) of one
head, the two that rotary embedding mixes, so it can rotate its own products and store them:
queries to the output, keys and values to their cache slots. Rounding follows the three kernels it
replaces (fused.add_rms_norm, the product rounded to the model's dtype, rope_write_kv) step for step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from python_backend.ops import pdl
from python_backend.ops.gemv import MAX_ROWS, GemvConfig
from python_backend.ops.pdl import wait_for_previous
from python_backend.ops.rounding import rounded
from python_backend.ops.triton_attention import _rotate


@triton.jit
def _residual_rows(X, RES, m, k, mask, stride_x, stride_r, HAS_ADD: tl.constexpr, dtype: tl.constexpr):
    """The residual stream's new rows (previous output + residual, rounded as add_rms_norm rounds it)."""
    h = tl.load(RES + m[:, None] * stride_r + k[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        x = tl.load(X + m[:, None] * stride_x + k[None, :], mask=mask, other=0.0).to(tl.float32)
        h = rounded(x + h, dtype)
    return h


@triton.jit
def _normed(h, rstd, LN, k, mask_k, dtype: tl.constexpr):
    w = tl.load(LN + k, mask=mask_k, other=0.0).to(tl.float32)
    return rounded(rounded(h * rstd[:, None], dtype) * w[None, :], dtype)


@triton.jit
def _add_norm_qkv_rope_kernel(
    X,
    RES,
    LN,
    W,
    B,
    POS,
    COS,
    SIN,
    SLOTS,
    Q_OUT,
    K_CACHE,
    V_CACHE,
    RES_OUT,
    M,
    K,
    eps,
    stride_x,
    stride_r,
    stride_ro,
    stride_w,
    stride_cos,
    stride_qo,
    H: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_ADD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PDL: tl.constexpr,
):
    dt: tl.constexpr = Q_OUT.dtype.element_ty
    half: tl.constexpr = D // 2
    pid = tl.program_id(0)
    m = tl.arange(0, M_PAD)
    mask_m = m < M
    # this program's feature pairs: head j // half, features i and i + half of it
    j = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_j = j < (H + 2 * HKV) * half
    head = j // half
    i = j % half
    n1 = (head * D + i).to(tl.int64)
    # the first chunk of weights is loaded before waiting for the kernel ahead (pdl.py): no kernel writes them
    k = tl.arange(0, BLOCK_K)
    w1_first = tl.load(W + n1[:, None] * stride_w + k[None, :], mask=mask_j[:, None] & (k < K)[None, :], other=0.0)
    w2_first = tl.load(
        W + (n1 + half)[:, None] * stride_w + k[None, :], mask=mask_j[:, None] & (k < K)[None, :], other=0.0
    )
    wait_for_previous(PDL)
    # the norm's statistics, over whole rows; program 0 stores the new residual rows on the way
    ss = tl.zeros((M_PAD,), tl.float32)
    # a row mask rather than a scalar `pid == 0`: Triton 3.9's interpreter rejects a scalar in a block mask
    store_rows = mask_m & ((m * 0 + pid) == 0)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xm = mask_m[:, None] & (k < K)[None, :]
        h = _residual_rows(X, RES, m, k, xm, stride_x, stride_r, HAS_ADD, dt)
        if HAS_ADD:
            tl.store(
                RES_OUT + m[:, None] * stride_ro + k[None, :], h.to(dt), mask=store_rows[:, None] & (k < K)[None, :]
            )
        ss += tl.sum(h * h, 1)
    rstd = 1.0 / tl.sqrt(ss / K + eps)
    k = tl.arange(0, BLOCK_K)
    xm = mask_m[:, None] & (k < K)[None, :]
    x = _normed(_residual_rows(X, RES, m, k, xm, stride_x, stride_r, HAS_ADD, dt), rstd, LN, k, k < K, dt)
    acc1 = tl.sum(x[:, None, :] * w1_first.to(tl.float32)[None, :, :], axis=2)
    acc2 = tl.sum(x[:, None, :] * w2_first.to(tl.float32)[None, :, :], axis=2)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask_k = k < K
        xm = mask_m[:, None] & mask_k[None, :]
        x = _normed(_residual_rows(X, RES, m, k, xm, stride_x, stride_r, HAS_ADD, dt), rstd, LN, k, mask_k, dt)
        wm = mask_j[:, None] & mask_k[None, :]
        w1 = tl.load(W + n1[:, None] * stride_w + k[None, :], mask=wm, other=0.0).to(tl.float32)
        w2 = tl.load(W + (n1 + half)[:, None] * stride_w + k[None, :], mask=wm, other=0.0).to(tl.float32)
        acc1 += tl.sum(x[:, None, :] * w1[None, :, :], axis=2)
        acc2 += tl.sum(x[:, None, :] * w2[None, :, :], axis=2)
    if HAS_BIAS:
        acc1 += tl.load(B + n1, mask=mask_j, other=0.0).to(tl.float32)[None, :]
        acc2 += tl.load(B + n1 + half, mask=mask_j, other=0.0).to(tl.float32)[None, :]
    a1 = rounded(acc1, dt)  # the product as the QKV projection's output holds it
    a2 = rounded(acc2, dt)
    pos = tl.load(POS + m, mask=mask_m, other=0)
    slot = tl.load(SLOTS + m, mask=mask_m, other=0).to(tl.int64)
    rm = mask_m[:, None] & mask_j[None, :]
    cos = tl.load(COS + pos[:, None] * stride_cos + i[None, :], mask=rm, other=0.0).to(tl.float32)
    sin = tl.load(SIN + pos[:, None] * stride_cos + i[None, :], mask=rm, other=0.0).to(tl.float32)
    r1 = _rotate(a1, a2, cos, sin, dt)
    r2 = _rotate(a2, -a1, cos, sin, dt)
    is_q = head < H
    is_k = (head >= H) & (head < H + HKV)
    is_v = head >= H + HKV
    q_at = Q_OUT + m[:, None] * stride_qo + (head * D + i)[None, :]
    tl.store(q_at, r1, mask=rm & is_q[None, :])
    tl.store(q_at + half, r2, mask=rm & is_q[None, :])
    cache_at = slot[:, None] * (HKV * D) + (tl.where(is_k, head - H, head - H - HKV) * D + i)[None, :]
    tl.store(K_CACHE + cache_at, r1.to(K_CACHE.dtype.element_ty), mask=rm & is_k[None, :])
    tl.store(K_CACHE + cache_at + half, r2.to(K_CACHE.dtype.element_ty), mask=rm & is_k[None, :])
    tl.store(V_CACHE + cache_at, a1.to(V_CACHE.dtype.element_ty), mask=rm & is_v[None, :])
    tl.store(V_CACHE + cache_at + half, a2.to(V_CACHE.dtype.element_ty), mask=rm & is_v[None, :])


def add_norm_qkv_rope(
    out: torch.Tensor | None,
    residual: torch.Tensor,
    ln: torch.Tensor,
    eps: float,
    qkv_w: torch.Tensor,
    qkv_b: torch.Tensor | None,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    config: GemvConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The work of fused.add_rms_norm(out, residual, ln), the QKV projection and rope_write_kv at once,
    for at most MAX_ROWS rows. `out` None: the residual is the layer's input as is (the first layer).
    Returns (rotated q [M, H, D], the residual stream's new rows); k and v go to the cache."""
    m, k = residual.shape
    n = qkv_w.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"add_norm_qkv_rope takes at most {MAX_ROWS} rows, got {m}")
    if k_cache.dtype != residual.dtype:
        raise ValueError(
            f"add_norm_qkv_rope writes {residual.dtype} values and the cache holds {k_cache.dtype}; "
            "a quantized cache takes rope_write_kv"
        )
    if n != (num_heads + 2 * num_kv_heads) * head_dim or qkv_w.shape[1] != k or head_dim % 2:
        raise ValueError(
            f"add_norm_qkv_rope shapes: residual {tuple(residual.shape)}, qkv {tuple(qkv_w.shape)}, "
            f"heads {num_heads}+2x{num_kv_heads} of {head_dim}"
        )
    if qkv_w.stride(1) != 1 or residual.stride(1) != 1 or (out is not None and out.stride(1) != 1):
        raise ValueError("add_norm_qkv_rope needs rows with unit stride")
    cfg = config or GemvConfig()
    if cfg.block_n % 2:
        raise ValueError(f"add_norm_qkv_rope needs an even block_n (pairs of features), got {cfg.block_n}")
    q = torch.empty(m, num_heads, head_dim, dtype=residual.dtype, device=residual.device)
    res_out = torch.empty_like(residual) if out is not None else residual
    if m == 0:
        return q, res_out
    pairs = n // 2
    block_p = cfg.block_n // 2
    x = out if out is not None else residual
    use_pdl = pdl.enabled(residual.device)
    _add_norm_qkv_rope_kernel[(triton.cdiv(pairs, block_p),)](
        x,
        residual,
        ln,
        qkv_w,
        qkv_b if qkv_b is not None else qkv_w,
        positions,
        cos,
        sin,
        slots,
        q,
        k_cache,
        v_cache,
        res_out,
        m,
        k,
        eps,
        x.stride(0),
        residual.stride(0),
        res_out.stride(0),
        qkv_w.stride(0),
        cos.stride(0),
        q.stride(0),
        H=num_heads,
        HKV=num_kv_heads,
        D=head_dim,
        M_PAD=triton.next_power_of_2(m),
        BLOCK_P=block_p,
        BLOCK_K=min(cfg.block_k, triton.next_power_of_2(k)),
        HAS_ADD=out is not None,
        HAS_BIAS=qkv_b is not None,
        PDL=use_pdl,
        num_warps=cfg.num_warps,
        **pdl.launch(use_pdl),
    )
    return q, res_out
