"""Matrix-vector products for decode steps of a few rows, as a Triton kernel (GPU; also runs in
Triton's interpreter).

A decode step of one to four sequences reads every weight once and does almost no arithmetic, so
its time is the time to stream the weights. cuBLAS reaches only about half of the memory bandwidth
on the attention projections at one row. This kernel gives each program a few whole output rows,
streams their weights along K in wide vector loads and keeps the few input rows in registers. The
down projection can take the gate-up output directly and apply SiLU-and-multiply as it loads it,
which saves a launch and a round trip through memory; its rounding is that of fused.silu_mul, step
for step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from python_backend.ops import fused, pdl
from python_backend.ops.pdl import wait_for_previous
from python_backend.ops.rounding import rounded

MAX_ROWS = 4  # more rows than this are a small GEMM: cuBLAS's tensor cores win there


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 8
    block_k: int = 512
    num_warps: int = 4
    defer: bool = False  # sum the products along K in place and reduce across threads once, at the end


@triton.jit
def _weights(W, n, mask_n, k0, K, stride_w, BLOCK_K: tl.constexpr):
    k = k0 + tl.arange(0, BLOCK_K)
    return tl.load(
        W + n[:, None].to(tl.int64) * stride_w + k[None, :], mask=mask_n[:, None] & (k < K)[None, :], other=0.0
    )


@triton.jit
def _inputs(X, m, mask_m, k0, K, stride_x, dtype: tl.constexpr, BLOCK_K: tl.constexpr, SILU_MUL: tl.constexpr):
    k = k0 + tl.arange(0, BLOCK_K)
    xm = mask_m[:, None] & (k < K)[None, :]
    if SILU_MUL:  # X holds (gate, up) side by side: silu(gate) * up, rounded as fused.silu_mul rounds it
        gate = tl.load(X + m[:, None] * stride_x + k[None, :], mask=xm, other=0.0).to(tl.float32)
        up = tl.load(X + m[:, None] * stride_x + K + k[None, :], mask=xm, other=0.0).to(tl.float32)
        act = rounded(gate / (1.0 + tl.exp(-gate)), dtype)
        return rounded(act * up, dtype)
    else:
        return tl.load(X + m[:, None] * stride_x + k[None, :], mask=xm, other=0.0).to(tl.float32)


@triton.jit
def _gemv_kernel(
    X,
    W,
    B,
    OUT,
    M,
    N,
    K,
    stride_x,
    stride_w,
    stride_o,
    M_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU_MUL: tl.constexpr,
    DEFER: tl.constexpr,
    PDL: tl.constexpr,
):
    dt: tl.constexpr = X.dtype.element_ty
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, M_PAD)
    mask_n = n < N
    mask_m = m < M
    # the first chunk of weights is loaded before waiting for the kernel ahead (pdl.py): no kernel writes them
    w = _weights(W, n, mask_n, 0, K, stride_w, BLOCK_K)
    wait_for_previous(PDL)
    x = _inputs(X, m, mask_m, 0, K, stride_x, dt, BLOCK_K, SILU_MUL)
    if DEFER:  # products summed in place; one reduction across threads at the end
        part = x[:, None, :] * w.to(tl.float32)[None, :, :]
    else:
        acc = tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        w = _weights(W, n, mask_n, k0, K, stride_w, BLOCK_K)
        x = _inputs(X, m, mask_m, k0, K, stride_x, dt, BLOCK_K, SILU_MUL)
        if DEFER:
            part += x[:, None, :] * w.to(tl.float32)[None, :, :]
        else:
            acc += tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    if DEFER:
        acc = tl.sum(part, axis=2)
    if HAS_BIAS:
        acc += tl.load(B + n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    # rounded to the inputs' dtype even where OUT is float32 (logits), as F.linear(...).float() rounds
    tl.store(
        OUT + m[:, None] * stride_o + n[None, :],
        rounded(acc, X.dtype.element_ty).to(OUT.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    silu_mul: bool = False,
    config: GemvConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS) @ weight[N, K]^T (+ bias) -> [M, N], like F.linear. With silu_mul, x is
    [M, 2K] (gate, up) and the product is taken with silu(gate) * up. `out` (x's dtype or float32,
    rows of unit stride) receives the product, rounded to x's dtype either way: F.linear(...).float()
    in one kernel, for logits."""
    m = x.shape[0]
    n, k = weight.shape
    if m > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {m}")
    if x.shape[1] != (2 * k if silu_mul else k) or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"gemv shapes: x {tuple(x.shape)}, weight {tuple(weight.shape)}, silu_mul={silu_mul}")
    cfg = config or GemvConfig()
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.stride(1) != 1 or out.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"gemv out: {tuple(out.shape)} {out.dtype}, want ({m}, {n}) of {x.dtype} or float32")
    if m == 0:
        return out
    use_pdl = pdl.enabled(x.device)
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x,
        weight,
        bias if bias is not None else weight,
        out,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        M_PAD=triton.next_power_of_2(m),
        BLOCK_N=cfg.block_n,
        BLOCK_K=min(cfg.block_k, triton.next_power_of_2(k)),
        HAS_BIAS=bias is not None,
        SILU_MUL=silu_mul,
        DEFER=cfg.defer,
        PDL=use_pdl,
        num_warps=cfg.num_warps,
        **pdl.launch(use_pdl),
    )
    return out


# configs that beat cuBLAS by the margin on some of Llama-3.2-1B's shapes (scripts/gpu_gemv_sweep.py times
# them): the LM head at one and two rows, the output and fused down projections at one row; few, for few
# start-up compiles
CANDIDATES = (GemvConfig(4, 1024, 4), GemvConfig(2, 2048, 4), GemvConfig(4, 2048, 8))


def graph_time(calls, replays: int = 5) -> float:
    """Seconds per replay of a CUDA graph of `calls()`, as a decode step runs its kernels (compiled,
    and cuBLAS's workspace made, on a side stream before the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        calls()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        calls()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / replays


def time_per_call(
    weights: list[torch.Tensor], rows: int, config: GemvConfig | None, silu_mul: bool = False, replays: int = 5
) -> float:
    """Seconds per product of `rows` rows with each of `weights` in turn (as the layers use them, so
    no weight is still in L2), under a CUDA graph as in a decode step; config None is F.linear."""
    k = weights[0].shape[1]
    x = torch.randn(rows, 2 * k if silu_mul else k, device=weights[0].device, dtype=weights[0].dtype)

    def calls() -> None:
        for w in weights:
            if config is not None:
                gemv(x, w, silu_mul=silu_mul, config=config)
            else:
                F.linear(fused.silu_mul(x) if silu_mul else x, w)

    return graph_time(calls, replays) / len(weights)


MARGIN = 0.95  # the kernel must beat cuBLAS by 5%: a choice that flips with timing noise between restarts
# would change which kernel rounds a product, and so greedy output at bfloat16 near-ties


def name(cfg: GemvConfig) -> str:
    return f"{cfg.block_n}x{cfg.block_k}w{cfg.num_warps}" + ("d" if cfg.defer else "")


def choose(
    weights: list[torch.Tensor], rows: int, silu_mul: bool = False, candidates: tuple[GemvConfig, ...] = CANDIDATES
) -> tuple[GemvConfig | None, dict[str, float]]:
    """The fastest candidate config where it beats cuBLAS by the margin, else None (cuBLAS). Also
    returns every timing, for the record."""
    times = {"cublas": time_per_call(weights, rows, None, silu_mul)}
    for cfg in candidates:
        times[name(cfg)] = time_per_call(weights, rows, cfg, silu_mul)
    best = min(candidates, key=lambda c: times[name(c)])
    return (best if times[name(best)] < MARGIN * times["cublas"] else None), times
