"""Activations rounded to E4M3 per row in one kernel, against PyTorch's own rounding (GPU only:
Triton's interpreter gets float8 wrong where rounding carries into the exponent, 7.8 becoming 4)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e .[dev] installs it)")

from python_backend.models.quantized import fp8_supported  # noqa: E402

GPU = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not GPU or not fp8_supported(torch.device("cuda")),
    reason="needs a GPU with FP8 (compute capability 8.9+); Triton's interpreter rounds float8 wrongly",
)


def _reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.float().abs().amax(1, keepdim=True).clamp(min=1e-12) / 448.0
    return (x.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale


@pytest.mark.parametrize("rows,cols", [(1, 2048), (5, 576), (16, 8192), (33, 14336)])  # 14336: two passes
def test_codes_and_scales_are_pytorchs_and_padding_rows_are_empty(rows, cols):
    from python_backend.ops.fp8_rows import fp8_rows

    g = torch.Generator(device="cuda").manual_seed(cols)
    x = torch.randn(rows, cols, device="cuda", generator=g) * torch.rand(rows, 1, device="cuda", generator=g) * 30
    x[0, 3] = 900.0  # an outlier sets its row's scale
    x = x.bfloat16()
    codes, scales = fp8_rows(x)
    padded = -(-rows // 16) * 16
    assert codes.shape == (padded, cols) and codes.dtype == torch.float8_e4m3fn and scales.shape == (padded, 1)
    want_codes, want_scales = _reference(x)
    torch.testing.assert_close(scales[:rows], want_scales, rtol=1e-6, atol=0)
    assert torch.equal(codes[:rows].float(), want_codes.float())
    assert not codes[rows:].float().any() and torch.equal(scales[rows:], torch.ones_like(scales[rows:]))


def test_a_strided_view_and_a_zero_row():
    from python_backend.ops.fp8_rows import fp8_rows

    base = torch.randn(6, 4096, device="cuda", dtype=torch.bfloat16)
    base[2] = 0
    view = base[::2, :2048]  # rows 0, 2, 4 of a wider tensor
    codes, scales = fp8_rows(view)
    want_codes, _ = _reference(view)
    assert torch.equal(codes[:3].float(), want_codes.float())
    assert not codes[1].float().any() and scales[1].item() > 0
