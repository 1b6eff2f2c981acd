"""Quantized projections and rotary embedding as ONNX Runtime contrib operators: the operands hold
the engine's weights exactly, and ONNX Runtime's products match the dequantized reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from builders import onnx_nbits, onnx_rotary
from builders.quantize import quantize_int4, quantize_int8
from python_backend.models.quantized import QuantizedWeight

ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install -e .[onnx])")
onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install -e .[onnx])")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed (pip install -e .[onnx])")


def _weight(method: str, symmetric: bool = False, n: int = 96, k: int = 192, seed: int = 0):
    torch.manual_seed(seed)
    w = torch.randn(n, k) * 0.05
    if method == "int4":
        parts = quantize_int4(w, 32, symmetric)
        ours = QuantizedWeight("int4", parts["qweight"], parts["scale"], parts["offset"])
        return ours, onnx_nbits.from_int4(parts["qweight"], parts["scale"], parts["offset"])
    parts = quantize_int8(w)
    return QuantizedWeight("int8", parts["qweight"], parts["scale"]), onnx_nbits.from_int8(*parts.values())


@pytest.mark.parametrize("method,symmetric", [("int4", False), ("int4", True), ("int8", False)])
def test_operands_rebuild_the_engines_weight(method, symmetric):
    ours, nbits = _weight(method, symmetric)
    torch.testing.assert_close(nbits.dequantize(), ours.dequantize().float(), rtol=0, atol=1e-6)
    # symmetric codes and int8 use the operator's default zero point alone; float offsets need the correction
    assert (nbits.correction is None) == (method == "int8" or symmetric)


def test_concatenated_projections_are_the_parts_side_by_side():
    parts = [_weight("int4", symmetric, n=n, seed=n)[1] for n, symmetric in ((64, False), (32, True), (32, False))]
    both = onnx_nbits.concatenate(parts)
    torch.testing.assert_close(both.dequantize(), torch.cat([p.dequantize() for p in parts]))
    with pytest.raises(onnx_nbits.NBitsError, match="differ"):
        onnx_nbits.concatenate([parts[0], _weight("int8")[1]])


def _export(module: torch.nn.Module, example: tuple, path) -> ort.InferenceSession:
    table = onnx_nbits.translation_table() | onnx_rotary.translation_table()
    dims = tuple({0: torch.export.Dim(f"b{i}"), 1: torch.export.Dim(f"s{i}")} for i in range(len(example)))
    program = torch.onnx.export(module, example, dynamo=True, custom_translation_table=table, dynamic_shapes=dims)
    program.save(str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("method,symmetric", [("int4", False), ("int4", True), ("int8", False)])
def test_onnx_runtime_product_matches_the_dequantized_reference(method, symmetric, tmp_path):
    ours, nbits = _weight(method, symmetric)
    x = torch.randn(2, 5, nbits.k)
    reference = (x @ ours.dequantize().float().t()).numpy()
    block_sum = onnx_nbits.block_sum_matrix(nbits.k, nbits.block_size)
    for level, tolerance in ((onnx_nbits.EXACT_ACCURACY_LEVEL, 1e-4), (onnx_nbits.SERVED_ACCURACY_LEVEL, 0.05)):
        linear = onnx_nbits.NBitsLinear(nbits, None, level, block_sum)
        session = _export(linear, (x,), tmp_path / f"{method}-{level}.onnx")
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        scale = np.abs(reference).max()
        assert np.abs(got - reference).max() <= tolerance * scale, f"accuracy level {level}"
    ops = [node.op_type for node in onnx.load(str(tmp_path / f"{method}-{level}.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 1 and ops.count("MatMul") == (0 if nbits.correction is None else 2)


def test_onnx_runtime_rotary_matches_the_reference(tmp_path):
    heads, hd, positions = 3, 16, 64
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.outer(torch.arange(positions).float(), inv)

    class Rotate(torch.nn.Module):
        def forward(self, x, position_ids):
            return onnx_rotary.rotary(x, position_ids, freqs.cos(), freqs.sin(), heads)

    x = torch.randn(2, 4, heads * hd)
    position_ids = torch.tensor([[3, 4, 5, 6], [10, 11, 12, 13]])
    session = _export(Rotate(), (x, position_ids), tmp_path / "rotary.onnx")
    got = session.run(None, {"x": x.numpy(), "position_ids": position_ids.numpy()})[0]
    # the reference against the plain formula
    xh = x.reshape(2, 4, heads, hd)
    cos = torch.cat([freqs.cos()] * 2, -1)[position_ids].unsqueeze(2)
    sin = torch.cat([freqs.sin()] * 2, -1)[position_ids].unsqueeze(2)
    expected = (xh * cos + torch.cat([-xh[..., hd // 2 :], xh[..., : hd // 2]], -1) * sin).reshape(2, 4, -1)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(Rotate()(x, position_ids).numpy(), expected.numpy(), atol=1e-6)
