"""The Triton kernels against the PyTorch reference (the dense causal oracle and llama.py's ops).

On a GPU they run compiled, over the full sweep (contexts up to 4,096, batch sizes, block positions,
GQA ratios, bfloat16). Without one they run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), on smaller shapes: the interpreter is slow, but it checks the same index
arithmetic, masking and split merging.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e .[dev] installs it)")

from python_backend.models.llama import _rotate_half, rms_norm  # noqa: E402
from python_backend.ops import fused  # noqa: E402
from python_backend.ops import triton_attention as ta  # noqa: E402
from python_backend.ops.attention import (  # noqa: E402
    dequantize_rows,
    quantize_rows,
    read_rows,
    reference_attention,
    write_rows,
)

GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")
# the interpreter computes through numpy, which has no bfloat16: half precision stands in for it there
DTYPES = [torch.float32, torch.bfloat16 if GPU else torch.float16]
TOL = {torch.float32: 2e-5 if not GPU else 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _paged(lengths, h, hkv, d, bs, dtype, seed=0, spare=3):
    """Random q/k/v per sequence, K/V stored at scattered blocks; returns what the kernels need."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // bs) for n in lengths) + spare
    k_cache = torch.zeros(num_blocks, bs, hkv, d, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    seqs = []
    for n in lengths:
        nb = -(-n // bs)
        table, perm = perm[:nb], perm[nb:]
        q = torch.randn(n, h, d, generator=g).to(dtype)
        k = torch.randn(n, hkv, d, generator=g).to(dtype)
        v = torch.randn(n, hkv, d, generator=g).to(dtype)
        pos = torch.arange(n)
        t = torch.tensor(table)
        k_cache[t[pos // bs], pos % bs] = k
        v_cache[t[pos // bs], pos % bs] = v
        seqs.append((table, q, k, v))
    width = max(len(s[0]) for s in seqs) + 1  # one spare column: tables may be wider than needed
    tables = torch.tensor([s[0] + [0] * (width - len(s[0])) for s in seqs], dtype=torch.int32)
    return seqs, k_cache.to(DEV), v_cache.to(DEV), tables.to(DEV)


DECODE_CASES = [  # lengths, heads, kv heads, head dim, block size, splits
    ([1, 5, 16, 17], 4, 4, 16, 4, 1),
    ([33, 2, 64, 100], 8, 2, 32, 16, 1),
    ([130, 7], 8, 1, 16, 16, 4),
    ([1, 200], 6, 2, 64, 16, 8),
]
if GPU:
    DECODE_CASES += [
        ([1], 32, 8, 64, 16, 16),
        ([4096], 32, 8, 64, 16, 16),
        ([4096, 1, 777, 2048] * 8, 32, 8, 64, 16, 2),
        ([3000, 17, 4095], 28, 4, 128, 16, 4),
        ([64] * 256, 32, 8, 64, 16, 1),
        ([511, 1024], 16, 16, 64, 32, 8),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths,h,hkv,d,bs,splits", DECODE_CASES)
def test_decode_matches_reference(lengths, h, hkv, d, bs, splits, dtype):
    seqs, k_cache, v_cache, tables = _paged(lengths, h, hkv, d, bs, dtype)
    q = torch.stack([s[1][-1] for s in seqs]).to(DEV)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEV)
    for _launch in range(2):  # the split merge's arrival counters must be left at zero for the next launch
        out = ta.decode_attention(q, k_cache, v_cache, tables, lens, d**-0.5, num_splits=splits)
        for i, (_, qs, ks, vs) in enumerate(seqs):
            ref = reference_attention(qs.to(DEV), ks.to(DEV), vs.to(DEV), d**-0.5)[-1]
            torch.testing.assert_close(out[i].float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    if splits > 1:
        assert ta._split_counters(DEV, 1).count_nonzero() == 0


PREFILL_CASES = [  # lengths, tokens already cached, heads, kv heads, head dim, block size
    ([7, 1, 13], [0, 0, 0], 4, 2, 16, 4),
    ([40, 20, 5], [33, 12, 0], 6, 2, 32, 16),
    ([70], [64], 8, 8, 16, 16),
]
if GPU:
    PREFILL_CASES += [
        ([4096], [0], 32, 8, 64, 16),
        ([1000, 3000, 1], [900, 0, 0], 32, 8, 64, 16),
        ([257, 512, 129], [256, 128, 0], 28, 4, 128, 16),
        ([300] * 16, [0] * 16, 32, 32, 64, 32),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths,cached,h,hkv,d,bs", PREFILL_CASES)
def test_prefill_matches_reference(lengths, cached, h, hkv, d, bs, dtype):
    seqs, k_cache, v_cache, tables = _paged(lengths, h, hkv, d, bs, dtype)
    q = torch.cat([s[1][c:] for s, c in zip(seqs, cached)]).to(DEV)
    q_lens = [n - c for n, c in zip(lengths, cached)]
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    ctx = torch.tensor(lengths, dtype=torch.int32, device=DEV)
    out = ta.prefill_attention(q, k_cache, v_cache, tables, cu, ctx, max(q_lens), d**-0.5)
    row = 0
    for (_, qs, ks, vs), c in zip(seqs, cached):
        ref = reference_attention(qs.to(DEV), ks.to(DEV), vs.to(DEV), d**-0.5)[c:]
        torch.testing.assert_close(out[row : row + ref.shape[0]].float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
        row += ref.shape[0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_write_kv_matches_torch(dtype):
    h, hkv, d, bs, t = 6, 2, 32, 4, 9
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(t, (h + 2 * hkv) * d, generator=g).to(dtype).to(DEV)
    angles = torch.outer(torch.arange(64).float(), 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat((angles, angles), -1)
    cos, sin = emb.cos().to(dtype).to(DEV), emb.sin().to(dtype).to(DEV)
    positions = torch.tensor([0, 1, 2, 3, 4, 10, 11, 63, 5], device=DEV)
    slots = torch.tensor([3, 8, 9, 10, 11, 0, 1, 2, 15], device=DEV)
    k_cache = torch.zeros(4, bs, hkv, d, dtype=dtype, device=DEV)
    v_cache = torch.zeros_like(k_cache)
    q = ta.rope_write_kv(qkv, positions, cos, sin, slots, k_cache, v_cache, h, hkv, d)
    qk = qkv[:, : (h + hkv) * d].view(t, h + hkv, d)
    c, s = cos[positions][:, None], sin[positions][:, None]
    want = (qk * c + _rotate_half(qk) * s).float()  # llama.py's (and transformers') rounding, op by op
    tol = 1e-6 if dtype == torch.float32 else 0.0
    torch.testing.assert_close(q.float(), want[:, :h], atol=tol, rtol=tol)
    torch.testing.assert_close(k_cache.view(-1, hkv, d)[slots].float(), want[:, h:], atol=tol, rtol=tol)
    torch.testing.assert_close(v_cache.view(-1, hkv, d)[slots], qkv[:, (h + hkv) * d :].view(t, hkv, d))
    untouched = torch.ones(16, dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert k_cache.view(-1, hkv, d)[untouched.to(DEV)].abs().sum() == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_and_silu_mul_match_torch(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 96, generator=g).to(dtype).to(DEV)
    r = torch.randn(5, 96, generator=g).to(dtype).to(DEV)
    w = (1 + 0.1 * torch.randn(96, generator=g)).to(dtype).to(DEV)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5), atol=tol, rtol=tol)
    out, res = fused.add_rms_norm(x, r, w, 1e-5)
    torch.testing.assert_close(res, x + r)
    torch.testing.assert_close(out, rms_norm(x + r, w, 1e-5), atol=tol, rtol=tol)
    gu = torch.randn(3, 2 * 1500, generator=g).to(dtype).to(DEV)
    gate, up = gu.chunk(2, -1)
    torch.testing.assert_close(fused.silu_mul(gu), torch.nn.functional.silu(gate) * up, atol=tol, rtol=tol)


def test_num_splits_is_a_power_of_two_that_fills_the_gpu():
    assert ta.num_splits_for(1, 8) == 16
    assert ta.num_splits_for(256, 8) == 1
    assert ta.num_splits_for(4, 8, max_len=100) == 2
    for b in range(1, 300, 7):
        n = ta.num_splits_for(b, 8)
        assert n & (n - 1) == 0 and 1 <= n <= 16


CODE_DTYPES = {"int8": torch.int8, "fp8": torch.uint8}  # engine/kv_cache.py's pools


def _exact(rows: torch.Tensor) -> torch.Tensor:
    """A quantized cache's rows as float32 values: codes times scale, unrounded (the oracle)."""
    return dequantize_rows(rows, torch.float32)


def _codes_cache(values: torch.Tensor, kv: str) -> torch.Tensor:
    """A cache of values [N, bs, Hkv, D] rounded to codes, in the quantized cache's own layout."""
    n, bs, hkv, d = values.shape
    cache = torch.zeros(n, bs, hkv, d + 2, dtype=CODE_DTYPES[kv])
    write_rows(cache, torch.arange(n * bs), quantize_rows(values.cpu().view(n * bs, hkv, d), CODE_DTYPES[kv]))
    return cache


def _rows_at(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """A quantized cache's rows (codes and scale bytes) at the given slots."""
    n, bs, hkv, width = cache.shape
    return read_rows(cache.cpu(), torch.arange(n)).view(n * bs, hkv, width)[slots.cpu()]


def _quantized_paged(lengths, h, hkv, d, bs, dtype, kv):
    """_paged's sequences and caches, the caches rounded to codes, and each sequence's K and V as the
    codes give them back."""
    seqs, k_cache, v_cache, tables = _paged(lengths, h, hkv, d, bs, dtype)
    k_codes, v_codes = _codes_cache(k_cache, kv), _codes_cache(v_cache, kv)
    out = []
    for table, q, _, _ in seqs:
        pos = torch.arange(q.shape[0])
        slots = torch.tensor(table)[pos // bs] * bs + pos % bs
        out.append((table, q, _exact(_rows_at(k_codes, slots)), _exact(_rows_at(v_codes, slots))))
    return out, k_codes.to(DEV), v_codes.to(DEV), tables


@pytest.mark.parametrize("kv", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_write_kv_into_a_quantized_cache_stores_what_quantize_rows_makes(dtype, kv):
    h, hkv, d, bs, t = 6, 2, 32, 4, 9
    g = torch.Generator().manual_seed(3)
    qkv = (3 * torch.randn(t, (h + 2 * hkv) * d, generator=g)).to(dtype)
    qkv[0, (h + hkv) * d :] = 0.0  # an all-zero row takes the smallest scale
    # a row whose maximum makes the scale 1, with values halfway between two codes (ties go to the even
    # code), and for E4M3 subnormals and a tie among them
    ties = [127.0, 2.5, 3.5, -2.5, 0.5] if kv == "int8" else [448.0, 1.0625, 1.1875, -1.0625, 0.0068359375, 1e-3]
    qkv[1, (h + hkv) * d :] = 0.0
    qkv[1, (h + hkv) * d : (h + hkv) * d + len(ties)] = torch.tensor(ties)
    qkv = qkv.to(DEV)
    angles = torch.outer(torch.arange(64).float(), 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat((angles, angles), -1)
    cos, sin = emb.cos().to(dtype).to(DEV), emb.sin().to(dtype).to(DEV)
    positions = torch.tensor([0, 1, 2, 3, 4, 10, 11, 63, 5], device=DEV)
    slots = torch.tensor([3, 8, 9, 10, 11, 0, 1, 2, 15], device=DEV)
    k_cache = torch.zeros(4, bs, hkv, d + 2, dtype=CODE_DTYPES[kv], device=DEV)
    v_cache = torch.zeros_like(k_cache)
    q = ta.rope_write_kv(qkv, positions, cos, sin, slots, k_cache, v_cache, h, hkv, d)
    qk = qkv[:, : (h + hkv) * d].view(t, h + hkv, d)
    c, s = cos[positions][:, None], sin[positions][:, None]
    rotated = qk * c + _rotate_half(qk) * s
    tol = 1e-6 if dtype == torch.float32 else 0.0
    torch.testing.assert_close(q.float(), rotated[:, :h].float(), atol=tol, rtol=tol)
    want_k = quantize_rows(rotated[:, h:].cpu(), CODE_DTYPES[kv])
    want_v = quantize_rows(qkv[:, (h + hkv) * d :].view(t, hkv, d).cpu(), CODE_DTYPES[kv])
    got_k, got_v = _rows_at(k_cache, slots), _rows_at(v_cache, slots)
    assert torch.equal(got_v, want_v)
    if dtype == torch.float32:  # float32 rotation may differ in the last bit from PyTorch's: a code may move one step
        assert (got_k.view(torch.int8)[..., :d].int() - want_k.view(torch.int8)[..., :d].int()).abs().max() <= 1
        torch.testing.assert_close(_exact(got_k), _exact(want_k), atol=0.02, rtol=0.07)
    else:
        assert torch.equal(got_k, want_k)
    untouched = torch.ones(16, dtype=torch.bool)
    untouched[slots.cpu()] = False
    for cache in (k_cache, v_cache):
        assert _rows_at(cache, untouched.nonzero()[:, 0]).abs().sum() == 0


QUANTIZED_CASES = [([1, 5, 16, 17], 4, 4, 16, 4, 1), ([130, 7], 8, 1, 16, 16, 4)]
if GPU:
    QUANTIZED_CASES += [([4096, 1, 777, 2048] * 8, 32, 8, 64, 16, 2), ([64] * 256, 32, 8, 64, 16, 1)]


@pytest.mark.parametrize("kv", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths,h,hkv,d,bs,splits", QUANTIZED_CASES)
def test_decode_over_a_quantized_cache_matches_its_values(lengths, h, hkv, d, bs, splits, dtype, kv, monkeypatch):
    """On a GPU with float8 E4M3 codes go through its conversion, and through their bits here too."""
    if GPU and kv == "fp8" and dtype == torch.float32:
        monkeypatch.setattr(ta, "_has_float8", lambda device: False)
    seqs, k_cache, v_cache, tables = _quantized_paged(lengths, h, hkv, d, bs, dtype, kv)
    q = torch.stack([s[1][-1] for s in seqs]).to(DEV)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEV)
    configs = [None]
    if dtype == torch.bfloat16:  # another tile, with bfloat16 products (the default takes float16's)
        configs += [ta.DecodeConfig(block_n=64, num_warps=4, num_stages=3)]
    for config in configs:
        out = ta.decode_attention(q, k_cache, v_cache, tables.to(DEV), lens, d**-0.5, splits, config=config)
        for i, (_, qs, ks, vs) in enumerate(seqs):
            ref = reference_attention(qs.float().to(DEV), ks.to(DEV), vs.to(DEV), d**-0.5)[-1]
            torch.testing.assert_close(out[i].float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("kv", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_over_a_quantized_cache_matches_its_values(dtype, kv):
    lengths, cached, h, hkv, d, bs = [40, 20, 5], [33, 12, 0], 6, 2, 32, 16
    seqs, k_cache, v_cache, tables = _quantized_paged(lengths, h, hkv, d, bs, dtype, kv)
    q = torch.cat([s[1][c:] for s, c in zip(seqs, cached)]).to(DEV)
    q_lens = [n - c for n, c in zip(lengths, cached)]
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    ctx = torch.tensor(lengths, dtype=torch.int32, device=DEV)
    out = ta.prefill_attention(q, k_cache, v_cache, tables.to(DEV), cu, ctx, max(q_lens), d**-0.5)
    row = 0
    for (_, qs, ks, vs), c in zip(seqs, cached):
        ref = reference_attention(qs.float().to(DEV), ks.to(DEV), vs.to(DEV), d**-0.5)[c:]
        torch.testing.assert_close(out[row : row + ref.shape[0]].float(), ref, atol=TOL[dtype], rtol=TOL[dtype])
        row += ref.shape[0]


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_decode_over_small_values_of_a_quantized_cache_keeps_their_precision(kv, monkeypatch):
    """Values of 1e-4 take the smallest scale (2^-14); folded into the probabilities of a spread of
    scores, most of them well below 1, the products must not sink below half precision's normal
    range, where they keep few bits. Half precision products run on the GPU by default; in the
    interpreter the model's half precision does."""
    dtype = torch.bfloat16 if GPU else torch.float16
    lengths, h, hkv, d, bs = [600, 37], 4, 2, 32, 16
    seqs, k_cache, v_cache, tables = _paged(lengths, h, hkv, d, bs, dtype)
    v_small = _codes_cache(v_cache.float() * 1e-4, kv).to(DEV)
    k_codes = _codes_cache(k_cache, kv).to(DEV)
    q = (3 * torch.stack([s[1][-1] for s in seqs]).float()).to(dtype).to(DEV)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEV)
    out = ta.decode_attention(q, k_codes, v_small, tables.to(DEV), lens, d**-0.5)
    for i, (table, _, _, _) in enumerate(seqs):
        pos = torch.arange(lengths[i])
        slots = torch.tensor(table)[pos // bs] * bs + pos % bs
        ks, vs = _exact(_rows_at(k_codes, slots)), _exact(_rows_at(v_small, slots))
        ref = reference_attention(
            q[i : i + 1].float().expand(lengths[i], h, d).to(DEV), ks.to(DEV), vs.to(DEV), d**-0.5
        )
        torch.testing.assert_close(out[i].float(), ref[-1], atol=1e-7, rtol=1e-2)
