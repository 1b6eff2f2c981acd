"""The int8, int4 and fp8 decode GEMV kernels and the int8/int4 tensor-core GEMM against the
dequantized weight, and FP8's product (GPUs with FP8 only). On a GPU they run compiled over
Llama-3.2-1B shapes; without one in Triton's interpreter on small shapes, which checks the same
indexing, masking and group arithmetic."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e .[dev] installs it)")

from python_backend.models.quantized import QuantizedWeight, fp8_supported, pack_int4  # noqa: E402
from python_backend.ops.quant_gemv import (  # noqa: E402
    QuantGemvConfig,
    QuantMMConfig,
    TinyGemmConfig,
    choose,
    dequantize,
    name,
    quant_gemv,
    quant_mm,
    run,
    tinygemm_takes,
)

GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32
SHAPES = [(3072, 2048, 128), (2048, 8192, 64), (128256, 2048, 128)] if GPU else [(48, 128, 32), (37, 192, 64)]
CONFIGS = (
    [QuantGemvConfig(), QuantGemvConfig(1, 2048, 4), QuantGemvConfig(8, 1024, 8)]
    if GPU
    else [QuantGemvConfig(4, 64), QuantGemvConfig(8, 128), QuantGemvConfig(2, 256)]
)
MM_CONFIGS = (
    [QuantMMConfig(16, 64, 64, 4, 3), QuantMMConfig(64, 128, 64, 4, 3)]
    if GPU
    else [QuantMMConfig(16, 16, 32, 4, 1), QuantMMConfig(32, 32, 16, 4, 1)]
)


def _weights(n: int, k: int, group: int) -> list[QuantizedWeight]:
    g = torch.Generator().manual_seed(n + k)
    codes = torch.randint(0, 16, (n, k), generator=g)
    scale = (torch.rand(n, k // group, generator=g) * 0.02 + 0.001).half()
    offset = (-torch.rand(n, k // group, generator=g) * 0.1).half()
    int4 = QuantizedWeight("int4", pack_int4(codes), scale, offset)
    int8 = QuantizedWeight(
        "int8", torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8), torch.rand(n) * 0.01
    )
    return [w.to(DEV) for w in (int4, int8)]


@pytest.mark.parametrize("n,k,group", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 4])
@pytest.mark.parametrize("config", CONFIGS)
def test_quant_gemv_matches_dequantized_weight(n, k, group, rows, config):
    for w in _weights(n, k, group):
        x = torch.randn(rows, k, device=DEV).to(DTYPE)
        ref = x.float() @ w.dequantize().t()
        got = quant_gemv(x, w, config).float()
        tol = (1e-4 if DTYPE == torch.float32 else 1e-2) * ref.abs().max().item()
        assert (got - ref).abs().max().item() <= tol, w.method


@pytest.mark.parametrize("n,k,group", SHAPES[:2])
@pytest.mark.parametrize("rows", [5, 40])
@pytest.mark.parametrize("config", MM_CONFIGS)
def test_quant_mm_matches_dequantized_weight(n, k, group, rows, config):
    for w in _weights(n, k, group):
        x = torch.randn(rows, k, device=DEV).to(torch.bfloat16 if GPU else torch.float16)
        ref = x.float() @ w.dequantize().t()
        got = quant_mm(x, w, config).float()
        assert got.shape == (rows, n)
        rel = (got - ref).norm() / ref.norm()
        assert rel < 1e-2, (w.method, rel)  # the dequantized tile's rounding to 16 bits


def test_kernels_refuse_what_they_cannot_read():
    w = _weights(48, 128, 32)[0]
    odd = QuantizedWeight(
        "int4", w.qweight[:, :30].contiguous(), w.scale[:, :2].contiguous(), w.offset[:, :2].contiguous()
    )
    with pytest.raises(ValueError, match="multiple of 8"):
        quant_gemv(torch.randn(1, 60, device=DEV), odd)
    with pytest.raises(ValueError, match="16-bit inputs"):
        quant_mm(torch.randn(4, 128, device=DEV), w, QuantMMConfig(16, 16, 64, 4, 1))


@pytest.mark.parametrize("n,k,group", SHAPES[:2])
def test_dequantize_kernel_matches_reference(n, k, group):
    for w in _weights(n, k, group):
        assert torch.equal(dequantize(w, torch.float32), w.dequantize()), w.method


@pytest.mark.skipif(not GPU, reason="PyTorch's int4 kernel (tinygemm) runs on CUDA devices only")
@pytest.mark.parametrize("n,k,group", SHAPES)
@pytest.mark.parametrize("rows", [1, 4, 40])
@pytest.mark.parametrize("inner_k_tiles", [4, 8])
def test_tinygemm_matches_dequantized_weight(n, k, group, rows, inner_k_tiles):
    """Our codes retiled for PyTorch's kernel, with bfloat16 (scale, zero) pairs: the same weight up to
    the pairs' rounding."""
    w = _weights(n, k, group)[0]
    config = TinyGemmConfig(inner_k_tiles)
    assert tinygemm_takes(w, torch.bfloat16, config) and not tinygemm_takes(w, torch.float16, config)
    x = torch.randn(rows, k, device=DEV, dtype=torch.bfloat16)
    ref = x.float() @ w.dequantize().t()
    got = run(x, w, config).float()
    rel = (got - ref).norm() / ref.norm()
    assert rel < 1e-2, rel


@pytest.mark.skipif(not GPU, reason="start-up timing picks among the GPU kernels")
def test_choice_is_the_fastest_kernel_that_agrees_with_the_exact_product():
    w = _weights(3072, 2048, 128)[0]
    config, times = choose([w], 1)
    assert {"dequantize+cublas", "tinygemm8", "4x1024w4"} <= set(times)
    fastest = min(times, key=times.get)
    assert (config is None) == (fastest == "dequantize+cublas") and (config is None or name(config) == fastest)
    # a kernel that writes nothing (PyTorch's on a GPU it was not built for), or that fails: never chosen
    w.tinygemm = lambda x, inner_k_tiles: torch.zeros(x.shape[0], w.shape[0], device=DEV, dtype=x.dtype)
    config, times = choose([w], 1)
    assert times["tinygemm8"] == float("inf") and not isinstance(config, TinyGemmConfig)

    def failing(x, inner_k_tiles):
        raise RuntimeError("no kernel image is available for execution on the device")

    w.tinygemm = failing
    assert choose([w], 1)[1]["tinygemm8"] == float("inf")
    # float16 activations: PyTorch's kernel takes bfloat16 only, so it is not even tried
    assert "tinygemm8" not in choose([w], 1, torch.float16)[1]


@pytest.mark.skipif(not GPU or not fp8_supported(DEV), reason="FP8 products need a GPU of compute capability 8.9+")
@pytest.mark.parametrize("rows", [1, 5, 256])
def test_fp8_product_matches_dequantized_weight(rows):
    from builders.quantize import quantize_fp8

    w = torch.randn(1024, 2048, device=DEV) / 2048**0.5
    for per_channel in (True, False):
        parts = quantize_fp8(w, per_channel)
        q = QuantizedWeight("fp8", parts["qweight"], parts["scale"])
        x = torch.randn(rows, 2048, device=DEV, dtype=torch.bfloat16)
        ref = x.float() @ q.dequantize().t()
        got = q.linear(x, dense=True).float()
        assert got.shape == (rows, 1024)
        rel = (got - ref).norm() / ref.norm()
        assert rel < 0.05, rel  # the activations' own E4M3 rounding
        if rows <= 4:  # the weight-only GEMV: only the output's rounding
            gemv = quant_gemv(x, q).float()
            assert (gemv - ref).abs().max() <= 1e-2 * ref.abs().max()
