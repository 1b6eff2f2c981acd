"""Attention over the paged KV cache: the PyTorch reference that runs on CPU and GPU.

Layout: per layer K and V are [num_blocks, block_size, num_kv_heads, head_dim]; a token's slot is
block * block_size + offset. Decode batches every one-token sequence into one call: blocks are
gathered with index_select (a whole block per index, far cheaper than per-token indexing), and the
query heads that share a KV head are laid along the query axis, so grouped-query attention needs no
copy of K and V. Prefill runs per sequence, causal, over cached prefix blocks plus the new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from python_backend.engine.kv_cache import SCALE_BYTES, code_views


@dataclass
class PrefillSeq:
    start: int  # first row of this sequence's tokens in the flat batch
    q_len: int  # new tokens
    context_len: int  # cached tokens + new tokens
    block_table: torch.Tensor  # [num_blocks] int64


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    num_decode: int = 0  # the first num_decode rows of the flat batch are one-token (decode) sequences
    decode_block_tables: torch.Tensor | None = None  # [Bd, max_blocks] (padded with block 0)
    decode_mask: torch.Tensor | None = None  # [Bd, 1, 1, max_blocks * block_size] additive, 0 or -inf
    prefills: list[PrefillSeq] = field(default_factory=list)
    # the Triton kernels' view of the same batch (triton_attention.py); int32 tensors
    decode_seq_lens: torch.Tensor | None = None  # [Bd]
    num_splits: int = 1  # decode split-KV factor
    prefill_cu_q: torch.Tensor | None = None  # [S + 1] row offsets within the prefill rows
    prefill_context_lens: torch.Tensor | None = None  # [S]
    prefill_block_tables: torch.Tensor | None = None  # [S, W]
    prefill_max_q: int = 0


_FP8_MAX = 448.0


def quantized(cache: torch.Tensor) -> bool:
    """A quantized KV cache (engine/kv_cache.py): int8 codes, or E4M3 codes held as uint8."""
    return cache.dtype in (torch.int8, torch.uint8)


def quantize_rows(x: torch.Tensor, code_dtype: torch.dtype) -> torch.Tensor:
    """[..., D] -> [..., D + 2] of `code_dtype`: codes scaled by the row's absolute maximum, then the
    float16 scale's two bytes."""
    xf = x.float()
    top = 127.0 if code_dtype == torch.int8 else _FP8_MAX
    scale = (xf.abs().amax(-1, keepdim=True) / top).clamp(min=2**-14).half()
    y = xf / scale.float()
    if code_dtype == torch.int8:
        codes = y.round().clamp(-127, 127).to(torch.int8)
    else:
        codes = y.clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    return torch.cat([codes, scale.view(code_dtype)], dim=-1)


def dequantize_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Codes times scale in float32, which holds the product exactly (an 8-bit code times an 11-bit
    scale), then `dtype`."""
    codes = rows[..., :-2]
    scale = rows[..., -2:].contiguous().view(torch.float16).float()
    values = codes.float() if rows.dtype == torch.int8 else codes.view(torch.float8_e4m3fn).float()
    return (values * scale).to(dtype)


def read_rows(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Whole blocks of a quantized cache as rows of codes and scale bytes [len(index), block_size,
    Hkv, D + 2] (a copy: in the cache each block keeps its codes and its scales apart)."""
    codes, scales = code_views(cache)
    return torch.cat([codes.index_select(0, index), scales.index_select(0, index)], -1)


def write_rows(cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """Store rows of codes and scale bytes ([T, Hkv, D + 2]) at their slots in a quantized cache."""
    codes, scales = code_views(cache)
    block, offset = slots // cache.shape[1], slots % cache.shape[1]
    codes[block, offset] = rows[..., :-SCALE_BYTES]
    scales[block, offset] = rows[..., -SCALE_BYTES:]


def _gathered(cache: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Whole blocks of the cache, dequantized where it is quantized."""
    return dequantize_rows(read_rows(cache, index), dtype) if quantized(cache) else cache.index_select(0, index)


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store the new tokens' K and V ([T, Hkv, D]) at their slots (as codes and scales where the
    cache is quantized)."""
    if quantized(k_cache):
        write_rows(k_cache, slot_mapping, quantize_rows(k, k_cache.dtype))
        write_rows(v_cache, slot_mapping, quantize_rows(v, v_cache.dtype))
        return
    hkv, width = k_cache.shape[-2:]
    k_cache.view(-1, hkv, width).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, hkv, width).index_copy_(0, slot_mapping, v)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [B, H, D] (one token per sequence) -> [B, H, D]."""
    b, h, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    n = block_tables.shape[1]
    flat = block_tables.reshape(-1)
    k = _gathered(k_cache, flat, q.dtype).view(b, n * bs, hkv, d).transpose(1, 2)
    v = _gathered(v_cache, flat, q.dtype).view(b, n * bs, hkv, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q.reshape(b, hkv, h // hkv, d), k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, h, d)


def prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq: PrefillSeq, scale: float
) -> torch.Tensor:
    """q [q_len, H, D] for the newest q_len tokens of a sequence whose K/V (all context_len tokens,
    the new ones included) are in the cache -> [q_len, H, D]."""
    q_len, h, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    n = -(-seq.context_len // bs)
    blocks = seq.block_table[:n]
    k = _gathered(k_cache, blocks, q.dtype).view(n * bs, hkv, d)[: seq.context_len]
    v = _gathered(v_cache, blocks, q.dtype).view(n * bs, hkv, d)[: seq.context_len]
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, q_len, D]
    kh = k.transpose(0, 1).unsqueeze(0)
    vh = v.transpose(0, 1).unsqueeze(0)
    if seq.context_len == q_len:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    else:
        offset = seq.context_len - q_len
        q_pos = torch.arange(offset, seq.context_len, device=q.device)[:, None]
        k_pos = torch.arange(seq.context_len, device=q.device)[None, :]
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=k_pos <= q_pos, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """One layer's attention for a flat batch of T new tokens: q [T, H, D], k and v [T, Hkv, D]."""
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = torch.empty_like(q)
    nd = meta.num_decode
    if nd:
        out[:nd] = decode_attention(q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_mask, scale)
    for seq in meta.prefills:
        rows = slice(seq.start, seq.start + seq.q_len)
        out[rows] = prefill_attention(q[rows], k_cache, v_cache, seq, scale)
    return out


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense causal attention for one sequence with no cache: q [L, H, D], k and v [L, Hkv, D].
    The oracle the paged paths and the GPU kernels are tested against."""
    g = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(g, dim=1).transpose(0, 1).float()
    vv = v.repeat_interleave(g, dim=1).transpose(0, 1).float()
    qq = q.transpose(0, 1).float()
    scores = qq @ kk.transpose(1, 2) * scale
    length = q.shape[0]
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return (scores.softmax(-1) @ vv).transpose(0, 1).to(q.dtype)
