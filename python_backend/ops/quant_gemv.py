"""Matrix products with int8 or int4 weights as Triton kernels (GPU; also in Triton's interpreter for
tests): a GEMV for decode steps of a few rows, and a tensor-core GEMM for batches of decode rows.

A decode step of a few rows streams every weight once, so its time is bytes over bandwidth: int8
halves it against bfloat16 and int4 quarters it, if turning codes into numbers keeps up with the
memory. The GEMV reads the codes as 32-bit words (eight int4 or four int8 codes), takes code j of
every word in turn, and makes it a float by or-ing it into the mantissa of 2^23 and subtracting
2^23: two cheap instructions instead of an int-to-float conversion, whose rate on the GPU is a
quarter of an add's. For int4 it sums x·q over each word's eight columns (one group) and applies
the group's scale and offset once per word: sum(x·(q·s + o)) = s·sum(x·q) + o·sum(x).

For more rows the weight is dequantized tile by tile in registers and multiplied on the tensor cores
(`quant_mm`), so a batch step reads the codes once instead of writing and reading a dense copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from python_backend.ops.rounding import rounded


@dataclass(frozen=True)
class QuantGemvConfig:
    """The GEMV's tile: output rows per program, columns per step along K, warps."""

    block_n: int = 4
    block_k: int = 1024
    num_warps: int = 4


@dataclass(frozen=True)
class QuantMMConfig:
    """The tensor-core GEMM's tile and pipeline depth."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class TinyGemmConfig:
    """PyTorch's CUDA int4 kernel (`_weight_int4pack_mm`) in place of ours; `inner_k_tiles` is its
    layout's depth along K."""

    inner_k_tiles: int = 8


def tinygemm_takes(weight, x_dtype: torch.dtype, config: TinyGemmConfig) -> bool:
    """Whether PyTorch's CUDA int4 kernel serves this weight: int4 in groups of 32 to 256, bfloat16
    activations, N a multiple of 8 and K of the layout's tile, on a GPU of compute capability 8.0 or
    later (the kernel is built for no other) and a PyTorch whose packing takes two codes per byte
    (2.5 and later)."""
    if weight.method != "int4" or x_dtype != torch.bfloat16 or weight.device.type != "cuda":
        return False
    if torch.torch_version.TorchVersion(torch.__version__) < "2.5":
        return False
    if torch.cuda.get_device_capability(weight.device) < (8, 0):
        return False
    n, k = weight.shape
    return weight.group_size in (32, 64, 128, 256) and n % 8 == 0 and k % (16 * config.inner_k_tiles) == 0


@triton.jit
def _code_as_float(words, j: tl.constexpr, BITS: tl.constexpr):
    """Code j (from the low bits) of each int32 word as float32: int4 codes 0..15, int8 codes
    -128..127 (two's complement, read unsigned and biased by 128)."""
    code = (words >> (BITS * j)) & ((1 << BITS) - 1)
    if BITS == 8:
        code = code ^ 0x80
    value = (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    if BITS == 8:
        value = value - 128.0
    return value


@triton.jit
def _int4_kernel(
    X, W, S, O, OUT, M, N, K, stride_x, stride_w, stride_s, stride_o,
    M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    """W: int32 words [N, K/8], word i holding columns 8i..8i+7 (the even column in each byte's low
    nibble); S, O: [N, K/GROUP] with GROUP a multiple of 8."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, M_PAD)
    mask_n, mask_m = n < N, m < M
    words: tl.constexpr = BLOCK_K // 8
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        i = k0 // 8 + tl.arange(0, words)
        mi = 8 * i < K
        wm = mask_n[:, None] & mi[None, :]
        xm = mask_m[:, None] & mi[None, :]
        w = tl.load(W + n[:, None].to(tl.int64) * stride_w + i[None, :], mask=wm, other=0)
        qx = tl.zeros((M_PAD, BLOCK_N, words), dtype=tl.float32)
        xs = tl.zeros((M_PAD, words), dtype=tl.float32)
        for j in tl.static_range(8):
            x = tl.load(X + m[:, None] * stride_x + 8 * i[None, :] + j, mask=xm, other=0.0).to(tl.float32)
            qx += x[:, None, :] * _code_as_float(w, j, 4)[None, :, :]
            xs += x
        g = (8 * i) // GROUP
        s = tl.load(S + n[:, None] * stride_s + g[None, :], mask=wm, other=0.0).to(tl.float32)
        o = tl.load(O + n[:, None] * stride_s + g[None, :], mask=wm, other=0.0).to(tl.float32)
        acc += tl.sum(qx * s[None, :, :] + xs[:, None, :] * o[None, :, :], axis=2)
    out = rounded(acc, X.dtype.element_ty)
    mask = mask_m[:, None] & mask_n[None, :]
    tl.store(OUT + m[:, None] * stride_o + n[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _int8_kernel(
    X, W, S, OUT, M, N, K, stride_x, stride_w, stride_o,
    M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """W: int32 words [N, K/4], word i holding columns 4i..4i+3; S: one scale per output row."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, M_PAD)
    mask_n, mask_m = n < N, m < M
    words: tl.constexpr = BLOCK_K // 4
    part = tl.zeros((M_PAD, BLOCK_N, words), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        i = k0 // 4 + tl.arange(0, words)
        mi = 4 * i < K
        w = tl.load(W + n[:, None].to(tl.int64) * stride_w + i[None, :], mask=mask_n[:, None] & mi[None, :], other=0)
        for j in tl.static_range(4):
            x = tl.load(X + m[:, None] * stride_x + 4 * i[None, :] + j, mask=mask_m[:, None] & mi[None, :], other=0.0)
            part += x.to(tl.float32)[:, None, :] * _code_as_float(w, j, 8)[None, :, :]
    s = tl.load(S + n, mask=mask_n, other=0.0).to(tl.float32)
    out = rounded(tl.sum(part, axis=2) * s[None, :], X.dtype.element_ty)
    mask = mask_m[:, None] & mask_n[None, :]
    tl.store(OUT + m[:, None] * stride_o + n[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _fp8_kernel(
    X, W, S, OUT, M, N, K, stride_x, stride_w, stride_o, stride_s,
    M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """E4M3 codes [N, K] used weight-only; one scale per row (stride_s 0: one for the tensor)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, M_PAD)
    mask_n, mask_m = n < N, m < M
    part = tl.zeros((M_PAD, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mk = k < K
        w = tl.load(W + n[:, None].to(tl.int64) * stride_w + k[None, :], mask=mask_n[:, None] & mk[None, :], other=0.0)
        x = tl.load(X + m[:, None] * stride_x + k[None, :], mask=mask_m[:, None] & mk[None, :], other=0.0)
        part += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    s = tl.load(S + n * stride_s, mask=mask_n, other=0.0).to(tl.float32)
    out = rounded(tl.sum(part, axis=2) * s[None, :], X.dtype.element_ty)
    tl.store(
        OUT + m[:, None] * stride_o + n[None, :], out.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :]
    )


@triton.jit
def _mm_kernel(
    X, W, S, O, OUT, M, N, K, stride_x, stride_w, stride_s, stride_o,
    INT4: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):  # fmt: skip
    """x [M, K] @ w^T with w dequantized per [BLOCK_N, BLOCK_K] tile into x's dtype. int4: W is
    uint8 [N, K/2] and BLOCK_K divides GROUP, so a tile has one scale and offset per row; int8: W is
    int8 [N, K] and the row scales apply to the sums."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = m < M, n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        k = k0 + tl.arange(0, BLOCK_K)
        mk = k < K
        x = tl.load(X + m[:, None] * stride_x + k[None, :], mask=mask_m[:, None] & mk[None, :], other=0.0)
        if INT4:
            j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            p = tl.load(
                W + n[:, None].to(tl.int64) * stride_w + j[None, :],
                mask=mask_n[:, None] & (2 * j < K)[None, :],
                other=0,
            )
            q = tl.reshape(tl.join(p & 0xF, p >> 4), (BLOCK_N, BLOCK_K)).to(tl.float32)
            s = tl.load(S + n * stride_s + k0 // GROUP, mask=mask_n, other=0.0).to(tl.float32)
            o = tl.load(O + n * stride_s + k0 // GROUP, mask=mask_n, other=0.0).to(tl.float32)
            w = (q * s[:, None] + o[:, None]).to(x.dtype)
        else:
            w = tl.load(
                W + n[:, None].to(tl.int64) * stride_w + k[None, :], mask=mask_n[:, None] & mk[None, :], other=0
            )
            w = w.to(x.dtype)
        acc = tl.dot(x, tl.trans(w), acc)
    if not INT4:
        acc = acc * tl.load(S + n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(
        OUT + m[:, None] * stride_o + n[None, :], acc.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :]
    )


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
    """The int8 or int4 weight as a dense [N, K] tensor of `dtype`, in one pass (the GPU's path for
    steps of many rows, such as prefills: no float32 temporaries of the whole matrix)."""
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


def gemv_takes(weight) -> bool:
    """Whether the GEMV can read this weight's codes as 32-bit words (and int4 groups hold whole words)."""
    n, k = weight.shape
    if weight.method == "int4":
        return k % 8 == 0 and weight.group_size % 8 == 0 and weight.qweight.is_contiguous()
    if weight.method == "int8":
        return k % 4 == 0 and weight.qweight.is_contiguous()
    return True


def _operands(x: torch.Tensor, weight) -> tuple[torch.Tensor, torch.Tensor]:
    """x made contiguous, and the output [M, N] in its dtype."""
    x = x.contiguous()
    return x, torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)


def quant_gemv(x: torch.Tensor, weight, config: QuantGemvConfig | None = None) -> torch.Tensor:
    """x [M, K] @ dequantized(weight)^T -> [M, N] in x's dtype, for a QuantizedWeight (int8, int4, or
    fp8 used weight-only: the activations stay as they are) and a few rows."""
    cfg = config or QuantGemvConfig()
    x, out = _operands(x, weight)
    m, (n, k) = x.shape[0], weight.shape
    if m == 0:
        return out
    grid = (triton.cdiv(n, cfg.block_n),)
    tile = {
        "M_PAD": triton.next_power_of_2(m),
        "BLOCK_N": cfg.block_n,
        "BLOCK_K": min(cfg.block_k, triton.next_power_of_2(k)),
    }
    if weight.method == "fp8":
        per_tensor = weight.scale.numel() == 1
        _fp8_kernel[grid](
            x, weight.qweight, weight.scale, out, m, n, k, x.stride(0), weight.qweight.stride(0), out.stride(0),
            0 if per_tensor else 1, **tile, num_warps=cfg.num_warps,
        )  # fmt: skip
        return out
    if not gemv_takes(weight):
        raise ValueError(
            "the GEMV takes int4 weights with K and the group a multiple of 8, int8 with K a multiple of 4 "
            f"(got {weight.method}, K={k})"
        )
    words = weight.qweight.view(torch.int32)
    if weight.method == "int8":
        _int8_kernel[grid](
            x, words, weight.scale, out, m, n, k, x.stride(0), words.stride(0), out.stride(0), **tile,
            num_warps=cfg.num_warps,
        )  # fmt: skip
        return out
    _int4_kernel[grid](
        x, words, weight.scale, weight.offset, out, m, n, k, x.stride(0), words.stride(0), weight.scale.stride(0),
        out.stride(0), **tile, GROUP=weight.group_size, num_warps=cfg.num_warps,
    )  # fmt: skip
    return out


def mm_takes(weight, x_dtype: torch.dtype, config: QuantMMConfig) -> bool:
    """Whether quant_mm serves this weight: int8 or int4 (a group a multiple of the tile's K) with
    16-bit activations for the tensor cores."""
    if x_dtype not in (torch.bfloat16, torch.float16) or weight.method not in ("int8", "int4"):
        return False
    return weight.method == "int8" or weight.group_size % config.block_k == 0


def quant_mm(x: torch.Tensor, weight, config: QuantMMConfig | None = None) -> torch.Tensor:
    """x [M, K] @ dequantized(weight)^T -> [M, N] on the tensor cores, the weight dequantized tile by
    tile (int8 or int4; x bfloat16 or float16)."""
    cfg = config or QuantMMConfig()
    if not mm_takes(weight, x.dtype, cfg):
        raise ValueError(f"quant_mm takes int8 or int4 weights (group a multiple of {cfg.block_k}) and 16-bit inputs")
    x, out = _operands(x, weight)
    m, (n, k) = x.shape[0], weight.shape
    if m == 0:
        return out
    int4 = weight.method == "int4"
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n))
    _mm_kernel[grid](
        x, weight.qweight, weight.scale, weight.offset if int4 else weight.scale, out, m, n, k,
        x.stride(0), weight.qweight.stride(0), weight.scale.stride(0) if int4 else 1, out.stride(0),
        INT4=int4, GROUP=weight.group_size if int4 else 1, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
    )  # fmt: skip
    return out


Config = QuantGemvConfig | QuantMMConfig | TinyGemmConfig


def run(x: torch.Tensor, weight, config: Config) -> torch.Tensor:
    """The product by whichever kernel `config` configures."""
    if isinstance(config, TinyGemmConfig):
        return weight.tinygemm(x, config.inner_k_tiles)
    return quant_mm(x, weight, config) if isinstance(config, QuantMMConfig) else quant_gemv(x, weight, config)


GEMV_CANDIDATES = (
    QuantGemvConfig(2, 1024, 4),
    QuantGemvConfig(4, 1024, 4),
    QuantGemvConfig(4, 2048, 8),
    QuantGemvConfig(8, 512, 4),
    QuantGemvConfig(8, 1024, 8),
)
MM_CANDIDATES = (
    QuantMMConfig(16, 64, 128, 4, 3),
    QuantMMConfig(64, 128, 64, 4, 3),
    QuantMMConfig(128, 128, 64, 8, 3),
)
GEMV_ROWS = (1, 2, 4, 8)
MM_ROWS = (16, 64, 256)
TINYGEMM_CANDIDATES = (TinyGemmConfig(8),)  # one layout: depth 4 timed the same
AGREEMENT = 1e-2  # a kernel whose product strays further from the exact one (relative norm) is never chosen
TUNED_ROWS = GEMV_ROWS + MM_ROWS


def choose(weights: list, rows: int, dtype: torch.dtype = torch.bfloat16) -> tuple[Config | None, dict[str, float]]:
    """The fastest of the kernels' configurations for `rows` rows of `dtype` activations over these
    weights (a layer's worth, in turn, under a CUDA graph as a decode step runs them), or None where
    the dense path is faster: FP8's scaled product, or the weight dequantized and cuBLAS. A
    configuration whose product strays from the weight's exact one, or that fails, is timed as
    never. Returns every timing too."""

    from python_backend.ops.gemv import graph_time

    w0 = weights[0]
    x = torch.randn(rows, w0.shape[1], device=w0.device, dtype=dtype)
    if w0.method == "fp8":
        exact = x.float() @ w0.dequantize().t()
    else:  # the one-pass dequantization: no float32 copy of a large weight
        exact = (x @ dequantize(w0, dtype).t()).float()

    def timed(config) -> float:
        if config is not None:
            try:
                got = run(x, w0, config).float()
                for w in weights[1:]:  # compiled, and any layout made, here rather than under the capture
                    run(x, w, config)
            except RuntimeError:
                return float("inf")
            if not (got - exact).norm() <= AGREEMENT * exact.norm():
                return float("inf")

        def calls() -> None:
            for w in weights:
                if config is None:
                    w.linear(x, dense=True)
                else:
                    run(x, w, config)

        return graph_time(calls) / len(weights)

    dense = "scaled_mm" if w0.method == "fp8" else "dequantize+cublas"
    times = {dense: timed(None)}
    if rows in GEMV_ROWS:
        candidates = list(GEMV_CANDIDATES) if gemv_takes(w0) else []
    else:
        candidates = [c for c in MM_CANDIDATES if mm_takes(w0, x.dtype, c)]
    candidates += [c for c in TINYGEMM_CANDIDATES if tinygemm_takes(w0, x.dtype, c)]
    for cfg in candidates:
        times[name(cfg)] = timed(cfg)
    if not candidates:
        return None, times
    best = min(candidates, key=lambda c: times[name(c)])
    return (best if times[name(best)] < times[dense] else None), times


def name(cfg: Config) -> str:
    if isinstance(cfg, TinyGemmConfig):
        return f"tinygemm{cfg.inner_k_tiles}"
    if isinstance(cfg, QuantMMConfig):
        return f"mm{cfg.block_m}x{cfg.block_n}x{cfg.block_k}w{cfg.num_warps}s{cfg.num_stages}"
    return f"{cfg.block_n}x{cfg.block_k}w{cfg.num_warps}"
