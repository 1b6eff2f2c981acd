"""`rounded` rounds float32 to bfloat16 exactly as PyTorch does (to nearest, ties to even)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e .[dev] installs it)")
import triton.language as tl  # noqa: E402

from python_backend.ops.rounding import rounded  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@triton.jit
def _round_kernel(X, Y, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + i, mask=i < N, other=0.0)
    tl.store(Y + i, rounded(x * 3.0, tl.bfloat16) * 0.5, mask=i < N)


def test_rounded_is_torch_bfloat16_rounding():
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            torch.randn(4000, generator=g) * 10.0 ** torch.randint(-6, 6, (4000,), generator=g),
            torch.tensor([0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 65504.0]),
        ]
    )
    y = torch.empty_like(x)
    xd, yd = x.to(DEV), y.to(DEV)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](xd, yd, x.numel(), BLOCK=1024)
    # what PyTorch computes: a bfloat16 product, then float32 arithmetic on it
    want = (x * 3.0).to(torch.bfloat16).float() * 0.5
    assert torch.equal(yd.cpu(), want)
    assert not torch.equal(want, x * 3.0 * 0.5)  # the rounding matters here: the test sees it dropped
