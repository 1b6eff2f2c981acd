"""The one-launch residual add + RMSNorm + QKV + rotary + KV write against the three kernels it replaces.

On a GPU over the Llama-3.2-1B layer shape in bfloat16; without one in Triton's interpreter on small
shapes (tests/conftest.py sets TRITON_INTERPRET=1), half precision standing in for bfloat16.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed (pip install -e .[dev] installs it)")

from python_backend.ops import fused  # noqa: E402
from python_backend.ops import triton_attention as ta
from python_backend.ops.fused_qkv import add_norm_qkv_rope  # noqa: E402
from python_backend.ops.gemv import MAX_ROWS, GemvConfig  # noqa: E402

GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")
DTYPES = [torch.float32, torch.bfloat16 if GPU else torch.float16]
# hidden, heads, kv heads, head dim
SHAPES = [(2048, 32, 8, 64), (896, 14, 2, 64)] if GPU else [(96, 6, 2, 16), (40, 2, 1, 8)]
CONFIGS = (
    [GemvConfig(4, 1024, 4), GemvConfig(2, 2048, 4), GemvConfig(8, 256, 8)]
    if GPU
    else [GemvConfig(4, 32), GemvConfig(8, 128)]
)


def _case(rows: int, hidden: int, h: int, hkv: int, d: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = (h + 2 * hkv) * d
    out = torch.randn(rows, hidden, generator=g).to(dtype).to(DEV)
    residual = torch.randn(rows, hidden, generator=g).to(dtype).to(DEV)
    ln = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype).to(DEV)
    w = (torch.randn(n, hidden, generator=g) / hidden**0.5).to(dtype).to(DEV)
    b = (0.1 * torch.randn(n, generator=g)).to(dtype).to(DEV) if bias else None
    angles = torch.outer(torch.arange(300).float(), 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat((angles, angles), -1)
    cos, sin = emb.cos().to(dtype).to(DEV), emb.sin().to(dtype).to(DEV)
    positions = torch.tensor([0, 299, 17, 64][:rows], device=DEV)
    slots = torch.tensor([5, 0, 13, 9][:rows], device=DEV)
    return out, residual, ln, w, b, positions, cos, sin, slots


def _caches(hkv: int, d: int, dtype: torch.dtype):
    k = torch.zeros(4, 4, hkv, d, dtype=dtype, device=DEV)
    return k, torch.zeros_like(k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden,h,hkv,d", SHAPES)
@pytest.mark.parametrize("rows", range(1, MAX_ROWS + 1))
@pytest.mark.parametrize("config", CONFIGS)
def test_fused_qkv_matches_the_three_kernels(rows, hidden, h, hkv, d, dtype, config):
    bias = hidden % 3 == 0  # some shapes with a bias (Qwen2), some without
    out, residual, ln, w, b, positions, cos, sin, slots = _case(rows, hidden, h, hkv, d, dtype, bias)
    eps = 1e-5
    x, want_res = fused.add_rms_norm(out, residual, ln, eps)
    qkv = F.linear(x, w, b)
    k_want, v_want = _caches(hkv, d, dtype)
    q_want = ta.rope_write_kv(qkv, positions, cos, sin, slots, k_want, v_want, h, hkv, d)
    k_got, v_got = _caches(hkv, d, dtype)
    q_got, res = add_norm_qkv_rope(
        out, residual, ln, eps, w, b, positions, cos, sin, slots, k_got, v_got, h, hkv, d, config=config
    )
    torch.testing.assert_close(res, want_res, atol=0, rtol=0)
    tol = 1e-4 if dtype == torch.float32 else (2e-2 if dtype == torch.bfloat16 else 4e-3)
    torch.testing.assert_close(q_got, q_want, atol=tol, rtol=tol)
    torch.testing.assert_close(k_got, k_want, atol=tol, rtol=tol)
    torch.testing.assert_close(v_got, v_want, atol=tol, rtol=tol)
    written = torch.zeros(16, dtype=torch.bool)
    written[slots.cpu()] = True
    assert k_got.view(16, -1)[~written.to(DEV)].abs().sum() == 0  # nothing outside the slots asked for
    assert v_got.view(16, -1)[~written.to(DEV)].abs().sum() == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_qkv_first_layer_norms_the_residual_as_is(dtype):
    hidden, h, hkv, d = SHAPES[0]
    _, residual, ln, w, b, positions, cos, sin, slots = _case(3, hidden, h, hkv, d, dtype, bias=False, seed=3)
    qkv = F.linear(fused.rms_norm(residual, ln, 1e-6), w)
    k_want, v_want = _caches(hkv, d, dtype)
    q_want = ta.rope_write_kv(qkv, positions, cos, sin, slots, k_want, v_want, h, hkv, d)
    k_got, v_got = _caches(hkv, d, dtype)
    q_got, res = add_norm_qkv_rope(
        None, residual, ln, 1e-6, w, None, positions, cos, sin, slots, k_got, v_got, h, hkv, d, config=CONFIGS[0]
    )
    assert res is residual
    tol = 1e-4 if dtype == torch.float32 else (2e-2 if dtype == torch.bfloat16 else 4e-3)
    torch.testing.assert_close(q_got, q_want, atol=tol, rtol=tol)
    torch.testing.assert_close(k_got, k_want, atol=tol, rtol=tol)
    torch.testing.assert_close(v_got, v_want, atol=tol, rtol=tol)


def test_fused_qkv_rejects_what_it_cannot_do():
    hidden, h, hkv, d = SHAPES[0]
    out, residual, ln, w, b, positions, cos, sin, slots = _case(1, hidden, h, hkv, d, torch.float32, bias=False)
    k, v = _caches(hkv, d, torch.float32)
    args = (ln, 1e-5, w, None, positions, cos, sin, slots, k, v)
    with pytest.raises(ValueError, match="at most"):
        big = torch.zeros(MAX_ROWS + 1, hidden, device=DEV)
        add_norm_qkv_rope(big, big, *args, h, hkv, d)
    with pytest.raises(ValueError, match="shapes"):
        add_norm_qkv_rope(out, residual, *args, h + 1, hkv, d)
    with pytest.raises(ValueError, match="even block_n"):
        add_norm_qkv_rope(out, residual, *args, h, hkv, d, config=GemvConfig(3, 32))
