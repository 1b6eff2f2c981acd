"""Attention over the paged KV cache as Triton kernels (GPU; also runs in Triton's interpreter).

Same cache layout as the PyTorch reference in attention.py, which is their test oracle: per layer K and
V are [num_blocks, block_size, num_kv_heads, head_dim] and a token's slot is block * block_size + offset.

- `rope_write_kv`: one launch per layer that rotates q and k and stores k and v at their slots
  (replaces about ten small PyTorch ops).
- `decode_attention`: one query token per sequence. A program takes one KV head and the query heads
  that share it (grouped-query attention reads each K/V tile once for the whole group), walks the
  sequence's block table in tiles, and keeps a running softmax. Long contexts are split over the KV
  length (split-KV, "flash-decoding") so that a few sequences still fill the GPU; the last split of
  each (sequence, KV head) to finish merges them by their log-sum-exp (an arrival counter), which
  saves a second launch per layer. The split size is computed in the kernel from the
  sequence length, so one captured CUDA graph serves every context length.
- `prefill_attention`: variable-length causal attention for a flat batch of prompt chunks; keys come
  from the cache (cached prefix blocks and the chunk just written), so prefix caching and chunked
  prefill need nothing special.

A quantized cache (`--kv-cache-dtype int8|fp8`, engine/kv_cache.py) holds each token's head vector as
its codes and a float16 scale, each block its codes first and then its scales. `rope_write_kv` rounds
k and v to codes as it stores them, and the attention kernels read the codes, turn them into numbers
exactly (E4M3 by the GPU's float8 conversion where there is one, by its bits elsewhere and in Triton's
interpreter), and apply the scales per key: to the scores for K, to the probabilities for V. The
decode kernel's products take float16 then (it holds every code exactly and has more mantissa than
bfloat16). Such a tile is bound by converting codes rather than by memory, so a code cache buys
capacity (about twice the tokens), not speed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from python_backend.engine.kv_cache import SCALE_BYTES
from python_backend.ops import pdl
from python_backend.ops.pdl import wait_for_previous
from python_backend.ops.rounding import rounded

# what a cache holds: the KV_CODES argument of the kernels. E4M3 codes are read by their bits, or,
# compiled for a GPU with float8 (compute capability 8.9 and later), by its own conversion
PLAIN, INT8_CODES, FP8_CODES, FP8_CODES_NATIVE = 0, 1, 2, 3


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def supported(head_dim: int) -> bool:
    return head_dim >= 16 and head_dim == _pow2(head_dim)


def _precision(dtype: torch.dtype) -> str:
    # float32 engines are the exactness reference: no TF32 rounding inside the products
    return "ieee" if dtype == torch.float32 else "tf32"


def kv_codes(cache: torch.Tensor) -> int:
    """PLAIN for a cache of model-dtype values; INT8_CODES or FP8_CODES for a quantized one (int8 codes,
    or E4M3 codes held as uint8, as engine/kv_cache.py allocates them)."""
    return {torch.int8: INT8_CODES, torch.uint8: FP8_CODES}.get(cache.dtype, PLAIN)


@functools.cache
def _has_float8(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _read_codes(cache: torch.Tensor) -> int:
    """kv_codes, with E4M3 read by the GPU's float8 conversion where it has one."""
    codes = kv_codes(cache)
    return FP8_CODES_NATIVE if codes == FP8_CODES and _has_float8(cache.device) else codes


@triton.jit
def _nearest_int(y):
    """float32 y with |y| < 2^22 to the nearest integer, ties to even, as int32: adding 1.5 * 2^23
    leaves the rounded integer in the mantissa's low bits."""
    return (y + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000


@triton.jit
def _encode(y, CODES: tl.constexpr):
    """y (a value over its row's scale) as code bits in int32, rounded to nearest, ties to even, as
    PyTorch rounds: int8 in [-127, 127], or E4M3 (sign, 4 exponent bits of bias 7, 3 mantissa bits)."""
    if CODES == 1:
        return tl.minimum(tl.maximum(_nearest_int(y), -127), 127)
    a = tl.minimum(tl.abs(y), 448.0)
    bits = a.to(tl.int32, bitcast=True)
    # normal: float32's exponent and top 3 mantissa bits, rounded on the bits below and rebiased
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - (120 << 3)
    magnitude = tl.where(a < 0.015625, _nearest_int(a * 512.0), normal)  # below 2^-6: steps of 2^-9
    return tl.where(y < 0, magnitude | 0x80, magnitude)


@triton.jit
def _decode(codes, CODES: tl.constexpr, dtype: tl.constexpr):
    """Codes as exact values in `dtype`: int8 as they are; E4M3 by the GPU's conversion, or placed into
    float16's bits, which makes 1/256 of the value (float16's exponent bias is 8 more), so the row's
    scale carries the 256."""
    if CODES == 1:
        return codes.to(tl.float32).to(dtype)
    if CODES == 3:
        return codes.to(tl.float8e4nv, bitcast=True).to(dtype)
    c = codes.to(tl.int32)
    half = ((c & 0x80) << 8) | ((c & 0x7F) << 7)
    return half.to(tl.uint16).to(tl.float16, bitcast=True).to(dtype)


@triton.jit
def _row_scale(at, mask, CODES: tl.constexpr):
    """The float16 scale stored in the two bytes at `at` (little-endian), as float32; times 256 for
    E4M3 codes read by their bits (see _decode)."""
    lo = tl.load(at, mask=mask, other=0).to(tl.uint8, bitcast=True).to(tl.int32)
    hi = tl.load(at + 1, mask=mask, other=0).to(tl.uint8, bitcast=True).to(tl.int32)
    scale = (lo | (hi << 8)).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    if CODES == 2:
        scale = scale * 256.0
    return scale


@triton.jit
def _store_rows(at, scale_at, lo, hi, mask, D: tl.constexpr, CODES: tl.constexpr):
    """Store rows whose first and second halves are `lo` and `hi` ([R, D / 2], float32) at row
    pointers `at` ([R, 1]): as they are, or as codes, with each row's float16 scale at `scale_at`
    (from the row's absolute maximum, as attention.quantize_rows computes it)."""
    half: tl.constexpr = D // 2
    i = tl.arange(0, half)[None, :]
    if CODES == 0:
        tl.store(at + i, lo.to(at.dtype.element_ty), mask=mask)
        tl.store(at + half + i, hi.to(at.dtype.element_ty), mask=mask)
    else:
        top = 127.0 if CODES == 1 else 448.0
        amax = tl.maximum(tl.max(tl.abs(lo), 1), tl.max(tl.abs(hi), 1))
        scale = tl.maximum(tl.math.div_rn(amax, tl.full(amax.shape, top, tl.float32)), 2**-14).to(tl.float16)
        s = scale.to(tl.float32)[:, None]
        codes_lo = _encode(tl.math.div_rn(lo, tl.broadcast_to(s, lo.shape)), CODES)
        codes_hi = _encode(tl.math.div_rn(hi, tl.broadcast_to(s, hi.shape)), CODES)
        tl.store(at + i, codes_lo.to(at.dtype.element_ty), mask=mask)
        tl.store(at + half + i, codes_hi.to(at.dtype.element_ty), mask=mask)
        bits = scale.to(tl.uint16, bitcast=True).to(tl.int32)[:, None]
        tl.store(scale_at, (bits & 0xFF).to(tl.uint8).to(at.dtype.element_ty, bitcast=True), mask=mask)
        tl.store(scale_at + 1, (bits >> 8).to(tl.uint8).to(at.dtype.element_ty, bitcast=True), mask=mask)


@triton.jit
def _rotate(a, b, cos, sin, dtype: tl.constexpr):
    """a*cos - b*sin, each product rounded to the model's dtype as transformers' (q*cos + rotate_half(q)*sin)
    rounds it: in bfloat16 that rounding decides near-tied greedy choices."""
    return (rounded(a * cos, dtype) - rounded(b * sin, dtype)).to(dtype)


@triton.jit
def _rope_write_kv_kernel(
    QKV,
    POS,
    COS,
    SIN,
    SLOTS,
    Q_OUT,
    K_CACHE,
    V_CACHE,
    stride_qkv,
    stride_qo,
    stride_cos,
    H: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    H_PAD: tl.constexpr,
    HKV_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    KV_CODES: tl.constexpr,
):
    t = tl.program_id(0)
    half: tl.constexpr = D // 2
    pos = tl.load(POS + t)
    slot = tl.load(SLOTS + t).to(tl.int64)
    i = tl.arange(0, half)
    cos = tl.load(COS + pos * stride_cos + i).to(tl.float32)[None, :]
    sin = tl.load(SIN + pos * stride_cos + i).to(tl.float32)[None, :]
    row = QKV + t * stride_qkv
    hq = tl.arange(0, H_PAD)[:, None]
    mq = hq < H
    x1 = tl.load(row + hq * D + i[None, :], mask=mq, other=0.0).to(tl.float32)
    x2 = tl.load(row + hq * D + half + i[None, :], mask=mq, other=0.0).to(tl.float32)
    qo = Q_OUT + t * stride_qo + hq * D + i[None, :]
    tl.store(qo, _rotate(x1, x2, cos, sin, Q_OUT.dtype.element_ty), mask=mq)
    tl.store(qo + half, _rotate(x2, -x1, cos, sin, Q_OUT.dtype.element_ty), mask=mq)
    hk = tl.arange(0, HKV_PAD)[:, None]
    mk = hk < HKV
    krow = row + H * D
    k1 = tl.load(krow + hk * D + i[None, :], mask=mk, other=0.0).to(tl.float32)
    k2 = tl.load(krow + hk * D + half + i[None, :], mask=mk, other=0.0).to(tl.float32)
    dtype: tl.constexpr = Q_OUT.dtype.element_ty
    if KV_CODES:  # codes of the block's tokens first, then their scales (engine/kv_cache.py)
        block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
        at = block * (BLOCK_SIZE * HKV * (D + 2)) + (offset * HKV + hk) * D
        scale_at = block * (BLOCK_SIZE * HKV * (D + 2)) + BLOCK_SIZE * HKV * D + (offset * HKV + hk) * 2
    else:
        at = slot * (HKV * D) + hk * D
        scale_at = at
    k_lo = _rotate(k1, k2, cos, sin, dtype).to(tl.float32)
    k_hi = _rotate(k2, -k1, cos, sin, dtype).to(tl.float32)
    _store_rows(K_CACHE + at, K_CACHE + scale_at, k_lo, k_hi, mk, D, KV_CODES)
    vrow = row + (H + HKV) * D + hk * D
    v_lo = tl.load(vrow + i[None, :], mask=mk, other=0.0).to(tl.float32)
    v_hi = tl.load(vrow + half + i[None, :], mask=mk, other=0.0).to(tl.float32)
    _store_rows(V_CACHE + at, V_CACHE + scale_at, v_lo, v_hi, mk, D, KV_CODES)


def rope_write_kv(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> torch.Tensor:
    """qkv [T, (H + 2 Hkv) * D] (q, k, v side by side, as the fused projection makes them); cos and sin
    [max_len, D] tables. Returns the rotated q [T, H, D]; rotated k and v go to the cache (as codes
    and scales where it is quantized)."""
    t = qkv.shape[0]
    q = torch.empty(t, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if t:
        _rope_write_kv_kernel[(t,)](
            qkv,
            positions,
            cos,
            sin,
            slots,
            q,
            k_cache,
            v_cache,
            qkv.stride(0),
            q.stride(0),
            cos.stride(0),
            H=num_heads,
            HKV=num_kv_heads,
            D=head_dim,
            H_PAD=_pow2(num_heads),
            HKV_PAD=_pow2(num_kv_heads),
            BLOCK_SIZE=k_cache.shape[1],
            KV_CODES=kv_codes(k_cache),
            num_warps=4,
        )
    return q


@triton.jit
def _scores(q, K, kv, sv, d, valid, scale, KV_CODES: tl.constexpr, dtype: tl.constexpr, PREC: tl.constexpr):
    """q·k over a tile of keys at row offsets `kv`, times the softmax scale (and, where the cache holds
    codes, each key's own scale, at offsets `sv`)."""
    k = tl.load(K + kv[:, None] + d[None, :], mask=valid[:, None], other=0)
    if KV_CODES:
        qk = tl.dot(q, tl.trans(_decode(k, KV_CODES, dtype)), input_precision=PREC)
        qk = qk * (_row_scale(K + sv, valid, KV_CODES) * scale)[None, :]
    else:
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    return qk


@triton.jit
def _times_v(p, V, kv, sv, d, valid, KV_CODES: tl.constexpr, dtype: tl.constexpr, PREC: tl.constexpr):
    """p·v over the same tile. Where the cache holds codes, each value's scale goes into its
    probability relative to the tile's largest scale, which multiplies the product after: the folded
    probabilities stay at most 1 and, in half precision, clear of its subnormal range."""
    v = tl.load(V + kv[:, None] + d[None, :], mask=valid[:, None], other=0)
    if KV_CODES:
        scales = _row_scale(V + sv, valid, KV_CODES)
        top = tl.max(scales, 0)
        top = tl.where(top > 0.0, top, 1.0)
        v = _decode(v, KV_CODES, dtype)
        pv = tl.dot((p * (scales / top)[None, :]).to(v.dtype), v, input_precision=PREC) * top
    else:
        pv = tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return pv


@triton.jit(do_not_specialize=["stride_tb"])  # the table width varies step to step: one compiled variant
def _decode_kernel(
    Q,
    K,
    V,
    TABLES,
    LENS,
    OUT,
    O_PART,
    LSE_PART,
    COUNTS,
    scale,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_tb,
    stride_ob,
    stride_oh,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    HKV: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    PREC: tl.constexpr,
    PDL: tl.constexpr,
    KV_CODES: tl.constexpr,
    HALF_DOT: tl.constexpr,
):
    wait_for_previous(PDL)  # q, and this step's key and value, come from the kernel ahead
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(LENS + b)
    tiles = tl.cdiv(seq_len, BLOCK_N)
    per_split = tl.cdiv(tiles, NUM_SPLITS) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    heads = kvh * GROUP + g
    gmask = g < GROUP
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0)
    dot_dtype: tl.constexpr = tl.float16 if HALF_DOT else Q.dtype.element_ty
    q = q.to(dot_dtype)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    for t0 in range(start, end, BLOCK_N):
        offs = t0 + tl.arange(0, BLOCK_N)
        valid = offs < end
        blk = tl.load(TABLES + b * stride_tb + offs // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        kv = blk * stride_kb + (offs % BLOCK_SIZE) * stride_kt + kvh * stride_kh
        sv = blk * stride_kb + BLOCK_SIZE * HKV * D + ((offs % BLOCK_SIZE) * HKV + kvh) * 2
        qk = _scores(q, K, kv, sv, d, valid, scale, KV_CODES, dot_dtype, PREC)
        qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp(qk - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _times_v(p, V, kv, sv, d, valid, KV_CODES, dot_dtype, PREC)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if NUM_SPLITS == 1:
        tl.store(
            OUT + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
            out.to(OUT.dtype.element_ty),
            mask=gmask[:, None],
        )
    else:
        tl.store(
            O_PART + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps + d[None, :],
            out,
            mask=gmask[:, None],
        )
        lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
        tl.store(LSE_PART + b * stride_lb + heads * stride_lh + split, lse, mask=gmask)
        # the last split of this (sequence, KV head) to finish merges them all by their log-sum-exp, in
        # place of a second kernel: every thread's stores above are made visible (barrier, then the
        # counter's release), and the merging program reads them from L2, past its own L1
        tl.debug_barrier()
        counter = COUNTS + b * HKV + kvh
        if tl.atomic_add(counter, 1, sem="acq_rel") == NUM_SPLITS - 1:
            s = tl.arange(0, NUM_SPLITS)
            lse_at = LSE_PART + b * stride_lb + heads[:, None] * stride_lh + s[None, :]
            lse_all = tl.load(lse_at, mask=gmask[:, None], other=0.0, cache_modifier=".cg")
            top = tl.max(lse_all, 1)
            merged = tl.zeros([GROUP_PAD, D], tl.float32)
            for i in tl.static_range(NUM_SPLITS):
                w_i = tl.exp(
                    tl.load(
                        LSE_PART + b * stride_lb + heads * stride_lh + i, mask=gmask, other=0.0, cache_modifier=".cg"
                    )
                    - top
                )
                part = tl.load(
                    O_PART + b * stride_pb + heads[:, None] * stride_ph + i * stride_ps + d[None, :],
                    mask=gmask[:, None],
                    other=0.0,
                    cache_modifier=".cg",
                )
                merged += part * w_i[:, None]
            merged = merged / tl.sum(tl.exp(lse_all - top[:, None]), 1)[:, None]
            tl.store(
                OUT + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                merged.to(OUT.dtype.element_ty),
                mask=gmask[:, None],
            )
            tl.atomic_xchg(counter, 0)  # ready for the next layer's launch


_COUNTS: dict[torch.device, torch.Tensor] = {}
MAX_COUNTERS = 1 << 16  # (sequence, KV head) pairs of one split decode launch


def _split_counters(device: torch.device, needed: int) -> torch.Tensor:
    """Zeroed int32 arrival counters, one buffer per device for the process's life: each launch leaves
    them zero again, and CUDA graphs keep its address. Allocated at the first split launch, which runs
    eagerly (graph capture warms up first)."""
    if needed > MAX_COUNTERS:
        raise ValueError(f"split decode of {needed} (sequence, KV head) pairs; at most {MAX_COUNTERS}")
    if device not in _COUNTS:
        _COUNTS[device] = torch.zeros(MAX_COUNTERS, dtype=torch.int32, device=device)
    return _COUNTS[device]


def _cache_strides(cache: torch.Tensor) -> tuple[int, int, int]:
    """Block, token and head strides of a layer cache's values, or of its codes where it holds codes
    (engine/kv_cache.code_views: head_dim + 2 bytes a row in the block's size, head_dim in its codes)."""
    if not kv_codes(cache):
        return cache.stride(0), cache.stride(1), cache.stride(2)
    hkv, width = cache.shape[2], cache.shape[3]
    return cache.stride(0), hkv * (width - SCALE_BYTES), width - SCALE_BYTES


def num_splits_for(batch: int, num_kv_heads: int, max_len: int | None = None, num_sms: int = 132) -> int:
    """Enough KV splits to give every SM about two programs, a power of two in [1, 16], and no more
    than the (known) longest context has tiles of 64 keys."""
    want = max(1, (2 * num_sms) // max(1, batch * num_kv_heads))
    if max_len is not None:
        want = min(want, max(1, -(-max_len // 64)))
    return min(16, _pow2(want) if want & (want - 1) == 0 else _pow2(want) // 2)


@dataclass(frozen=True)
class DecodeConfig:
    """The decode kernel's tile of keys, warps and pipeline depth; `half_dot`: with a quantized cache,
    the products in float16 (codes and query converted to it) instead of the model's bfloat16."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    half_dot: bool = False


def default_decode_config(head_dim: int, codes: int) -> DecodeConfig:
    """Tiles of 64 keys (32 past head size 128). A code cache's tiles are bound by converting codes
    rather than by memory, so they are smaller, with fewer warps and stages in flight, and take
    float16 products (scripts/gpu_kv_attention_sweep.py and gpu_profile_batch.py time the choices)."""
    if codes != PLAIN:
        return DecodeConfig(block_n=32, num_warps=2, num_stages=2, half_dot=True)
    return DecodeConfig(block_n=64 if head_dim <= 128 else 32)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int = 1,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """q [B, H, D], one token per sequence; block_tables [B, W] and seq_lens [B] (int32 or int64;
    a table may be longer than its sequence needs). Returns [B, H, D] (in `out` when given)."""
    b, h, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    group = h // hkv
    out = torch.empty_like(q) if out is None else out
    if b == 0:
        return out
    if num_splits > 1:
        o_part = torch.empty(b, h, num_splits, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, h, num_splits, dtype=torch.float32, device=q.device)
        counts = _split_counters(q.device, b * hkv)
    else:
        o_part = lse = counts = out  # unused
    codes = _read_codes(k_cache)
    config = config or default_decode_config(d, codes)
    use_pdl = pdl.enabled(q.device)
    _decode_kernel[(b, hkv, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        out,
        o_part,
        lse,
        counts,
        scale,
        q.stride(0),
        q.stride(1),
        *_cache_strides(k_cache),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        o_part.stride(0),
        o_part.stride(1),
        o_part.stride(2) if num_splits > 1 else 0,
        lse.stride(0),
        lse.stride(1),
        HKV=hkv,
        GROUP=group,
        GROUP_PAD=max(16, _pow2(group)),
        D=d,
        BLOCK_SIZE=block_size,
        BLOCK_N=config.block_n,
        NUM_SPLITS=num_splits,
        PREC=_precision(q.dtype),
        PDL=use_pdl,
        KV_CODES=codes,
        HALF_DOT=config.half_dot and codes != PLAIN and q.dtype == torch.bfloat16,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl.launch(use_pdl),
    )
    return out


@triton.jit(do_not_specialize=["stride_tb"])
def _prefill_kernel(
    Q,
    K,
    V,
    OUT,
    TABLES,
    CU_Q,
    CTX,
    scale,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_tb,
    stride_ot,
    stride_oh,
    HKV: tl.constexpr,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PREC: tl.constexpr,
    KV_CODES: tl.constexpr,
):
    s = tl.program_id(0)
    mt = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(CU_Q + s)
    q_len = tl.load(CU_Q + s + 1) - q_start
    if mt * BLOCK_M >= q_len:
        return
    ctx = tl.load(CTX + s)
    offset = ctx - q_len  # tokens already in the cache before this chunk
    m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < q_len
    d = tl.arange(0, D)
    q = tl.load(Q + (q_start + m)[:, None] * stride_qt + h * stride_qh + d[None, :], mask=mmask[:, None], other=0.0)
    q_pos = offset + m
    kvh = h // GROUP
    end = tl.minimum(ctx, offset + (mt + 1) * BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for t0 in range(0, end, BLOCK_N):
        offs = t0 + tl.arange(0, BLOCK_N)
        valid = offs < end
        blk = tl.load(TABLES + s * stride_tb + offs // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        kv = blk * stride_kb + (offs % BLOCK_SIZE) * stride_kt + kvh * stride_kh
        sv = blk * stride_kb + BLOCK_SIZE * HKV * D + ((offs % BLOCK_SIZE) * HKV + kvh) * 2
        qk = _scores(q, K, kv, sv, d, valid, scale, KV_CODES, Q.dtype.element_ty, PREC)
        qk = tl.where(valid[None, :] & (offs[None, :] <= q_pos[:, None]), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp(qk - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _times_v(p, V, kv, sv, d, valid, KV_CODES, Q.dtype.element_ty, PREC)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        OUT + (q_start + m)[:, None] * stride_ot + h * stride_oh + d[None, :],
        out.to(OUT.dtype.element_ty),
        mask=mmask[:, None],
    )


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_q_lens: torch.Tensor,
    context_lens: torch.Tensor,
    max_q_len: int,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, H, D]: the new tokens of S sequences back to back, sequence i's at rows
    cu_q_lens[i]:cu_q_lens[i+1]; context_lens [S] counts cached plus new tokens, whose K/V are all in
    the cache already. Causal. Returns [T, H, D] (in `out` when given)."""
    t, h, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    out = torch.empty_like(q) if out is None else out
    s = context_lens.shape[0]
    if t == 0 or s == 0:
        return out
    block_m = 64 if q.dtype != torch.float32 else 32
    block_n = 64 if q.dtype != torch.float32 else 32
    grid = (s, triton.cdiv(max_q_len, block_m), h)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        cu_q_lens,
        context_lens,
        scale,
        q.stride(0),
        q.stride(1),
        *_cache_strides(k_cache),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        HKV=hkv,
        GROUP=h // hkv,
        D=d,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PREC=_precision(q.dtype),
        KV_CODES=_read_codes(k_cache),
        num_warps=4,
    )
    return out
