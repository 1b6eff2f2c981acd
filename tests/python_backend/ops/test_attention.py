"""Paged attention (prefill with and without a cached prefix, batched decode) against the dense oracle."""

from __future__ import annotations

import pytest
import torch

from python_backend.ops.attention import AttentionMetadata, PrefillSeq, paged_attention, reference_attention


def _case(lengths, chunk_from, h=6, hkv=2, d=16, bs=4, dtype=torch.float32, seed=0):
    """Sequences whose first `chunk_from[i]` tokens are cached and the rest arrive now; blocks scattered."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // bs) for n in lengths) + 3
    k_cache = torch.zeros(num_blocks, bs, hkv, d, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    seqs = []
    for n in lengths:
        nb = -(-n // bs)
        table, perm = perm[:nb], perm[nb:]
        q = torch.randn(n, h, d, generator=g, dtype=dtype)
        k = torch.randn(n, hkv, d, generator=g, dtype=dtype)
        v = torch.randn(n, hkv, d, generator=g, dtype=dtype)
        seqs.append((table, q, k, v))
    for (table, _q, k, v), start in zip(seqs, chunk_from):  # the cached part, as earlier steps wrote it
        for pos in range(start):
            k_cache[table[pos // bs], pos % bs] = k[pos]
            v_cache[table[pos // bs], pos % bs] = v[pos]
    return seqs, k_cache, v_cache, bs


@pytest.mark.parametrize("lengths,cached", [([7, 1, 13], [0, 0, 0]), ([9, 20, 5], [4, 12, 0]), ([33], [32])])
def test_prefill_matches_reference(lengths, cached):
    seqs, k_cache, v_cache, bs = _case(lengths, cached)
    qs, ks, vs, slots, prefills = [], [], [], [], []
    for (table, q, k, v), start in zip(seqs, cached):
        prefills.append(
            PrefillSeq(
                start=sum(x.shape[0] for x in qs),
                q_len=q.shape[0] - start,
                context_len=q.shape[0],
                block_table=torch.tensor(table),
            )
        )
        qs.append(q[start:])
        ks.append(k[start:])
        vs.append(v[start:])
        slots += [table[p // bs] * bs + p % bs for p in range(start, q.shape[0])]
    meta = AttentionMetadata(slot_mapping=torch.tensor(slots), prefills=prefills)
    out = paged_attention(torch.cat(qs), torch.cat(ks), torch.cat(vs), k_cache, v_cache, meta, 0.25)
    row = 0
    for (_table, q, k, v), start in zip(seqs, cached):
        ref = reference_attention(q, k, v, 0.25)[start:]
        torch.testing.assert_close(out[row : row + ref.shape[0]], ref, atol=1e-5, rtol=1e-5)
        row += ref.shape[0]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_matches_reference(dtype, tol):
    lengths = [1, 5, 16, 17, 40]
    seqs, k_cache, v_cache, bs = _case(lengths, [n - 1 for n in lengths], dtype=dtype, seed=3)
    width = max(len(t) for t, *_ in seqs)
    tables = torch.tensor([t + [0] * (width - len(t)) for t, *_ in seqs])
    visible = torch.arange(width * bs)[None, :] < torch.tensor(lengths)[:, None]
    mask = torch.where(visible, 0.0, float("-inf")).to(dtype)[:, None, None, :]
    slots = torch.tensor([t[(n - 1) // bs] * bs + (n - 1) % bs for (t, *_), n in zip(seqs, lengths)])
    meta = AttentionMetadata(slot_mapping=slots, num_decode=len(lengths), decode_block_tables=tables, decode_mask=mask)
    q = torch.stack([s[1][-1] for s in seqs])
    k = torch.stack([s[2][-1] for s in seqs])
    v = torch.stack([s[3][-1] for s in seqs])
    out = paged_attention(q, k, v, k_cache, v_cache, meta, 0.25)
    for i, (_table, qq, kk, vv) in enumerate(seqs):
        ref = reference_attention(qq, kk, vv, 0.25)[-1]
        torch.testing.assert_close(out[i].float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("code_dtype,tol", [(torch.int8, 1 / 127), (torch.uint8, 2**-4)])
def test_quantized_rows_round_trip(code_dtype, tol):
    """int8 rows lose at most half a step of the row's maximum / 127; E4M3 rows a relative 2^-4."""
    from python_backend.ops.attention import dequantize_rows, quantize_rows

    x = torch.randn(7, 3, 16) * torch.tensor([0.01, 1.0, 300.0])[None, :, None]
    rows = quantize_rows(x, code_dtype)
    assert rows.dtype == code_dtype and rows.shape == (7, 3, 18)
    back = dequantize_rows(rows, torch.float32)
    top = x.abs().amax(-1, keepdim=True)
    assert ((back - x).abs() <= tol * top + 1e-6).all()


@pytest.mark.parametrize("code_dtype", [torch.int8, torch.uint8])
def test_quantized_cache_attention_close_to_dense(code_dtype):
    """The same batch through a quantized cache: K and V written as codes and scales, read back
    dequantized, attention within the rounding of the codes."""
    lengths, cached = [9, 20, 5], [0, 0, 0]
    seqs, k_cache, v_cache, bs = _case(lengths, cached)
    qs, ks, vs, slots, prefills = [], [], [], [], []
    for table, q, k, v in seqs:
        prefills.append(
            PrefillSeq(start=sum(x.shape[0] for x in qs), q_len=q.shape[0], context_len=q.shape[0],
                       block_table=torch.tensor(table))
        )  # fmt: skip
        qs.append(q)
        ks.append(k)
        vs.append(v)
        slots += [table[p // bs] * bs + p % bs for p in range(q.shape[0])]
    meta = AttentionMetadata(slot_mapping=torch.tensor(slots), prefills=prefills)
    q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
    dense = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), meta, 0.25)
    qk = torch.zeros(*k_cache.shape[:-1], k_cache.shape[-1] + 2, dtype=code_dtype)
    qv = torch.zeros_like(qk)
    got = paged_attention(q, k, v, qk, qv, meta, 0.25)
    assert qk.abs().sum() > 0, "the quantized cache was not written"
    tol = 0.02 if code_dtype == torch.int8 else 0.15
    assert (got - dense).abs().max() < tol
