"""The decode GEMV kernel against F.linear (and fused.silu_mul for the fused down projection).

On a GPU it runs compiled over the Llama-3.2-1B shapes in bfloat16; without one in Triton's
interpreter on small shapes (tests/conftest.py sets TRITON_INTERPRET=1), which checks the same
indexing, masking and rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed (pip install -e .[dev] installs it)")

from python_backend.ops import fused  # noqa: E402
from python_backend.ops.gemv import MAX_ROWS, GemvConfig, gemv  # noqa: E402

GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")
DTYPES = [torch.float32, torch.bfloat16 if GPU else torch.float16]
SHAPES = [(3072, 2048), (2048, 8192), (128256, 2048)] if GPU else [(48, 64), (37, 200)]
CONFIGS = (
    [GemvConfig(), GemvConfig(block_n=16, block_k=128), GemvConfig(2, 1024, 4, defer=True)]
    if GPU
    else [GemvConfig(4, 32), GemvConfig(8, 64), GemvConfig(2, 64, 4, defer=True)]
)


def _tol(dtype: torch.dtype, k: int) -> float:
    return {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype] * max(1.0, (k / 2048) ** 0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("config", CONFIGS)
def test_gemv_matches_linear(rows, n, k, dtype, config):
    g = torch.Generator().manual_seed(rows * 7 + n)
    x = torch.randn(rows, k, generator=g).to(DEV, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEV, dtype)
    b = torch.randn(n, generator=g).to(DEV, dtype)
    tol = _tol(dtype, k)
    torch.testing.assert_close(gemv(x, w, config=config), F.linear(x, w), atol=tol, rtol=tol)
    torch.testing.assert_close(gemv(x, w, b, config=config), F.linear(x, w, b), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_fused_silu_mul_matches_the_two_kernels(dtype):
    n, k = SHAPES[0][1], SHAPES[0][0] // 2 if GPU else 40
    g = torch.Generator().manual_seed(1)
    gate_up = torch.randn(3, 2 * k, generator=g).to(DEV, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEV, dtype)
    want = F.linear(fused.silu_mul(gate_up), w)
    tol = _tol(dtype, k)
    torch.testing.assert_close(gemv(gate_up, w, silu_mul=True, config=CONFIGS[0]), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_float32_logits_are_the_products_rounded_to_the_model_dtype(dtype):
    n, k = SHAPES[-1]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, k, generator=g).to(DEV, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEV, dtype)
    logits = torch.full((2, n), float("nan"), device=DEV)
    assert gemv(x, w, config=CONFIGS[0], out=logits) is logits
    torch.testing.assert_close(logits, gemv(x, w, config=CONFIGS[0]).float(), atol=0, rtol=0)


def test_gemv_rejects_what_it_cannot_do():
    w = torch.zeros(8, 16, device=DEV)
    with pytest.raises(ValueError, match="gemv out"):
        gemv(
            torch.zeros(1, 16, device=DEV, dtype=torch.float16),
            w.half(),
            out=torch.empty(1, 8, device=DEV, dtype=torch.int32),
        )
    with pytest.raises(ValueError, match="at most"):
        gemv(torch.zeros(MAX_ROWS + 1, 16, device=DEV), w)
    with pytest.raises(ValueError, match="shapes"):
        gemv(torch.zeros(1, 15, device=DEV), w)
    with pytest.raises(ValueError, match="shapes"):
        gemv(torch.zeros(1, 16, device=DEV), w, silu_mul=True)
