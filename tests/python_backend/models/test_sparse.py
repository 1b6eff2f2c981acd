"""2:4 weights on the semi-structured sparse kernels: where they can run, and that the product is
F.linear's, row-major, on either side of the dense cut-over."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from builders.prune import semi_structured_mask
from python_backend.models import sparse


def test_two_four_is_recognised():
    w = torch.randn(64, 128)
    assert not sparse.is_two_four(w)
    assert sparse.is_two_four(w * semi_structured_mask(w))
    assert not sparse.is_two_four(torch.randn(64, 126))


def test_cpu_and_float32_say_why_not():
    assert "CUDA" in sparse.supported(torch.device("cpu"), torch.bfloat16)
    if torch.cuda.is_available():
        assert "bfloat16" in sparse.supported(torch.device("cuda"), torch.float32)


def test_weights_that_cannot_go_sparse_stay_dense():
    w = torch.randn(64, 128)
    assert sparse.sparsify(w, 0) is w  # not 2:4
    odd = torch.randn(48, 96)
    assert sparse.sparsify(odd * semi_structured_mask(odd), 0).shape == (48, 96)  # does not tile
    quantized = object()  # a quantized weight keeps its own product
    assert sparse.sparsify(quantized, 0) is quantized


@pytest.mark.skipif(
    not torch.cuda.is_available() or sparse.supported(torch.device("cuda"), torch.bfloat16) is not None,
    reason="needs a CUDA GPU with sparse tensor cores (compute capability 8.0+)",
)
@pytest.mark.parametrize("min_rows", [0, 64])
def test_sparse_product_is_f_linear_row_major(min_rows):
    torch.manual_seed(0)
    w = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    w = w * semi_structured_mask(w)
    sw = sparse.SparseWeight.from_dense(w, min_rows)
    for rows in (8, 128):
        x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
        y = sw.linear(x)
        assert y.is_contiguous()
        torch.testing.assert_close(y.float(), F.linear(x, w).float(), rtol=2e-2, atol=0.5)
