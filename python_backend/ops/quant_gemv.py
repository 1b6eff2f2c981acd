"""Decode-step matrix-vector products with int8 or int4 weights, as Triton kernels (GPU; also in
Triton's interpreter for tests).

A decode step of a few rows streams every weight once, so its time is bytes over bandwidth: int8
halves it against bfloat16 and int4 quarters it. Each program owns a few output rows and walks K in
wide chunks. For int4 a byte holds two neighbouring columns; the kernel multiplies the even and odd
columns' codes by the matching inputs, sums the products of each group, and only then applies the
group's scale and offset: sum(x * (q * s + o)) = s * sum(x * q) + o * sum(x), two multiplies per
group instead of two per weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from python_backend.ops.rounding import rounded


@dataclass(frozen=True)
class QuantGemvConfig:
    block_n: int = 4
    block_k: int = 512
    num_warps: int = 4
    defer: bool = False  # sum the products in place along K and reduce across threads once, at the end
    gather: bool = False  # int4: each weight's scale and offset loaded beside it, instead of per-group sums


@triton.jit
def _codes_kernel(
    X, W, S, OUT, M, N, K, stride_x, stride_w, stride_o, stride_s,
    M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DEFER: tl.constexpr,
):  # fmt: skip
    """One code per weight (int8 or E4M3) and one scale per row (stride_s 0: one for the tensor)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, M_PAD)
    mask_n, mask_m = n < N, m < M
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    part = tl.zeros((M_PAD, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mk = k < K
        w = tl.load(W + n[:, None].to(tl.int64) * stride_w + k[None, :], mask=mask_n[:, None] & mk[None, :], other=0.0)
        x = tl.load(X + m[:, None] * stride_x + k[None, :], mask=mask_m[:, None] & mk[None, :], other=0.0)
        prod = x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        if DEFER:
            part += prod
        else:
            acc += tl.sum(prod, axis=2)
    if DEFER:
        acc = tl.sum(part, axis=2)
    s = tl.load(S + n * stride_s, mask=mask_n, other=0.0).to(tl.float32)
    out = rounded(acc * s[None, :], X.dtype.element_ty)
    mask = mask_m[:, None] & mask_n[None, :]
    tl.store(OUT + m[:, None] * stride_o + n[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _int4_kernel(
    X, W, S, O, OUT, M, N, K, stride_x, stride_w, stride_s, stride_o,
    M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    DEFER: tl.constexpr, GATHER: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, M_PAD)
    mask_n, mask_m = n < N, m < M
    half: tl.constexpr = BLOCK_K // 2
    groups: tl.constexpr = BLOCK_K // GROUP
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    part = tl.zeros((M_PAD, BLOCK_N, half), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        j = k0 // 2 + tl.arange(0, half)  # byte index: columns 2j and 2j + 1
        mj = 2 * j < K
        wm = mask_n[:, None] & mj[None, :]
        p = tl.load(W + n[:, None].to(tl.int64) * stride_w + j[None, :], mask=wm, other=0)
        lo = (p & 0xF).to(tl.float32)
        hi = (p >> 4).to(tl.float32)
        xm = mask_m[:, None] & mj[None, :]
        xe = tl.load(X + m[:, None] * stride_x + 2 * j[None, :], mask=xm, other=0.0).to(tl.float32)
        xo = tl.load(X + m[:, None] * stride_x + 2 * j[None, :] + 1, mask=xm, other=0.0).to(tl.float32)
        if GATHER:  # w = q * s + o per weight, s and o read beside the codes (cached: one per GROUP)
            gi = (2 * j) // GROUP
            s = tl.load(S + n[:, None] * stride_s + gi[None, :], mask=wm, other=0.0).to(tl.float32)
            o = tl.load(O + n[:, None] * stride_s + gi[None, :], mask=wm, other=0.0).to(tl.float32)
            prod = xe[:, None, :] * (lo * s + o)[None, :, :] + xo[:, None, :] * (hi * s + o)[None, :, :]
            if DEFER:
                part += prod
            else:
                acc += tl.sum(prod, axis=2)
        else:  # per group: s * sum(x * q) + o * sum(x)
            prod = xe[:, None, :] * lo[None, :, :] + xo[:, None, :] * hi[None, :, :]
            qx = tl.sum(tl.reshape(prod, (M_PAD, BLOCK_N, groups, GROUP // 2)), axis=3)
            xs = tl.sum(tl.reshape(xe + xo, (M_PAD, groups, GROUP // 2)), axis=2)
            g = k0 // GROUP + tl.arange(0, groups)
            gm = mask_n[:, None] & (g * GROUP < K)[None, :]
            s = tl.load(S + n[:, None] * stride_s + g[None, :], mask=gm, other=0.0).to(tl.float32)
            o = tl.load(O + n[:, None] * stride_s + g[None, :], mask=gm, other=0.0).to(tl.float32)
            acc += tl.sum(qx * s[None, :, :] + xs[:, None, :] * o[None, :, :], axis=2)
    if DEFER and GATHER:
        acc = tl.sum(part, axis=2)
    out = rounded(acc, X.dtype.element_ty)
    mask = mask_m[:, None] & mask_n[None, :]
    tl.store(OUT + m[:, None] * stride_o + n[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_kernel(W, S, O, OUT, N, K, stride_w, stride_s, IS_INT4: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (n < N)[:, None] & (k < K)[None, :]
    if IS_INT4:
        p = tl.load(W + n[:, None].to(tl.int64) * stride_w + (k // 2)[None, :], mask=mask, other=0)
        q = ((p >> ((k % 2) * 4)[None, :]) & 0xF).to(tl.float32)
        g = k // GROUP
        s = tl.load(S + n[:, None] * stride_s + g[None, :], mask=mask, other=0.0).to(tl.float32)
        o = tl.load(O + n[:, None] * stride_s + g[None, :], mask=mask, other=0.0).to(tl.float32)
        w = q * s + o
    else:
        q = tl.load(W + n[:, None].to(tl.int64) * stride_w + k[None, :], mask=mask, other=0).to(tl.float32)
        w = q * tl.load(S + n, mask=n < N, other=0.0).to(tl.float32)[:, None]
    tl.store(OUT + n[:, None].to(tl.int64) * K + k[None, :], w.to(OUT.dtype.element_ty), mask=mask)


def dequantize(weight, dtype: torch.dtype) -> torch.Tensor:
    """The int8 or int4 weight as a dense [N, K] tensor of `dtype`, in one pass (the GPU's fallback for
    steps of many rows: no float32 temporaries of the whole matrix)."""
    n, k = weight.shape
    out = torch.empty(n, k, dtype=dtype, device=weight.device)
    int4 = weight.method == "int4"
    grid = (triton.cdiv(n, 16), triton.cdiv(k, 256))
    _dequant_kernel[grid](
        weight.qweight, weight.scale, weight.offset if int4 else weight.scale, out, n, k,
        weight.qweight.stride(0), weight.scale.stride(0), IS_INT4=int4, GROUP=weight.group_size if int4 else 1,
        BLOCK_N=16, BLOCK_K=256,
    )  # fmt: skip
    return out


def quant_gemv(x: torch.Tensor, weight, config: QuantGemvConfig | None = None) -> torch.Tensor:
    """x [M, K] @ dequantized(weight)^T -> [M, N] in x's dtype, for a QuantizedWeight (int8, int4, or
    fp8 used weight-only: the activations stay as they are) and a few rows."""
    cfg = config or QuantGemvConfig()
    m = x.shape[0]
    n, k = weight.shape
    x = x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    grid = (triton.cdiv(n, cfg.block_n),)
    m_pad = triton.next_power_of_2(m)
    if weight.method in ("int8", "fp8"):
        block_k = min(cfg.block_k, triton.next_power_of_2(k))
        per_tensor = weight.scale.numel() == 1
        _codes_kernel[grid](
            x, weight.qweight, weight.scale, out, m, n, k, x.stride(0), weight.qweight.stride(0), out.stride(0),
            0 if per_tensor else 1, M_PAD=m_pad, BLOCK_N=cfg.block_n, BLOCK_K=block_k, DEFER=cfg.defer,
            num_warps=cfg.num_warps,
        )  # fmt: skip
        return out
    group = weight.group_size
    if group & (group - 1) or group < 2:
        raise ValueError(f"the int4 GEMV takes power-of-two group sizes, not {group}")
    block_k = max(group, min(cfg.block_k, triton.next_power_of_2(k)))
    _int4_kernel[grid](
        x, weight.qweight, weight.scale, weight.offset, out, m, n, k,
        x.stride(0), weight.qweight.stride(0), weight.scale.stride(0), out.stride(0),
        M_PAD=m_pad, BLOCK_N=cfg.block_n, BLOCK_K=block_k, GROUP=group, DEFER=cfg.defer, GATHER=cfg.gather,
        num_warps=cfg.num_warps,
    )  # fmt: skip
    return out


CANDIDATES = (
    QuantGemvConfig(1, 1024, 4),
    QuantGemvConfig(2, 512, 4),
    QuantGemvConfig(4, 512, 4, defer=True),
    QuantGemvConfig(2, 1024, 4, defer=True, gather=True),
    QuantGemvConfig(4, 512, 4, defer=True, gather=True),
)
TUNED_ROWS = (1, 2, 4, 8)


def choose(weights: list, rows: int) -> tuple[QuantGemvConfig | None, dict[str, float]]:
    """The fastest kernel configuration for `rows` rows over these weights (a layer's worth, in turn,
    under a CUDA graph as a decode step runs them), or None where dequantizing and using cuBLAS is
    faster. Returns every timing too."""

    from python_backend.ops.gemv import graph_time

    x = torch.randn(rows, weights[0].shape[1], device=weights[0].device, dtype=torch.bfloat16)

    def run(config: QuantGemvConfig | None):
        def calls() -> None:
            for w in weights:
                if config is None:
                    w.linear(x, dense=True)
                else:
                    quant_gemv(x, w, config)

        return graph_time(calls) / len(weights)

    dense = "scaled_mm" if weights[0].method == "fp8" else "dequantize+cublas"
    times = {dense: run(None)}
    candidates = [c for c in CANDIDATES if not (c.gather and weights[0].method != "int4")]
    for cfg in candidates:
        times[name(cfg)] = run(cfg)
    best = min(candidates, key=lambda c: times[name(c)])
    return (best if times[name(best)] < times[dense] else None), times


def name(cfg: QuantGemvConfig) -> str:
    return f"{cfg.block_n}x{cfg.block_k}w{cfg.num_warps}" + ("d" if cfg.defer else "") + ("g" if cfg.gather else "")
