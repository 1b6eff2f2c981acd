"""Quantized weights: each method's product against the weight it stands for, and the refusals a
bad quantized folder gets when loading."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from python_backend.engine.engine_folder import EngineFolderError, open_engine_folder
from python_backend.models import quantized
from python_backend.models.quantized import QuantizationError, QuantizedWeight, pack_int4, unpack_int4


def _int4(n: int, k: int, group: int, seed: int = 0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g)
    scale = (torch.rand(n, k // group, generator=g) * 0.02 + 0.001).half()
    offset = (-torch.rand(n, k // group, generator=g) * 0.1).half()
    return QuantizedWeight("int4", pack_int4(codes), scale, offset)


def _int8(n: int, k: int, seed: int = 0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    return QuantizedWeight("int8", codes, torch.rand(n, generator=g) * 0.01 + 1e-4)


def test_int4_packing_round_trips():
    codes = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (7, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    assert torch.equal(packed[:, 0] & 0xF, codes[:, 0]) and torch.equal(packed[:, 0] >> 4, codes[:, 1])


def test_a_second_layout_counts_in_memory_but_not_in_what_a_step_reads():
    w = _int4(128, 256, 32)
    stored = 128 * 128 + 2 * (2 * 128 * 256 // 32)  # codes, and float16 scale and offset per group
    assert w.read_bytes == w.num_bytes == stored
    w.linear(torch.randn(1, 256, dtype=torch.bfloat16))  # the CPU kernel's packed codes, made on first use
    assert w.read_bytes == stored < w.num_bytes


# 128 x 256: PyTorch's packed CPU kernel; 48 x 192: a shape it does not take (N not a multiple of 64)
@pytest.mark.parametrize("n,k,group", [(128, 256, 32), (128, 256, 128), (48, 192, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5])
def test_int4_product_matches_dequantized_reference(n, k, group, dtype, rows):
    w = _int4(n, k, group)
    x = torch.randn(rows, k).to(dtype)
    ref = x.float() @ w.dequantize().t()
    got = w.linear(x).float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert got.shape == (rows, n)
    assert (got - ref).abs().max().item() <= tol * ref.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5])
def test_int8_product_matches_dequantized_reference(dtype, rows):
    w = _int8(96, 160)
    x = torch.randn(rows, 160).to(dtype)
    ref = x.float() @ w.dequantize().t()
    got = w.linear(x, bias=torch.ones(96, dtype=dtype)).float() - 1
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert (got - ref).abs().max().item() <= tol * ref.abs().max().item()


def test_fused_projections_concatenate_along_n():
    parts = [_int4(64, 128, 32, seed=s) for s in range(3)]
    fused = quantized.concat(parts)
    assert fused.shape == (192, 128) and fused.group_size == 32
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    with pytest.raises(QuantizationError, match="group size"):
        quantized.concat([_int4(64, 128, 32), _int4(64, 128, 64)])


def test_fp8_dequantizes_per_channel_and_per_tensor():
    codes = torch.randn(32, 64).to(torch.float8_e4m3fn)
    per_channel = QuantizedWeight("fp8", codes, torch.rand(32) + 0.5)
    assert torch.equal(per_channel.dequantize(), codes.float() * per_channel.scale[:, None])
    per_tensor = QuantizedWeight("fp8", codes, torch.tensor([0.25]))
    assert torch.equal(per_tensor.dequantize(), codes.float() * 0.25)


def _stored(w: QuantizedWeight, name: str) -> dict[str, torch.Tensor]:
    out = {f"{name}.qweight": w.qweight, f"{name}.scale": w.scale}
    if w.offset is not None:
        out[f"{name}.offset"] = w.offset
    return out


def test_load_weight_refuses_missing_tensors_wrong_shapes_and_dtypes():
    cpu = torch.device("cpu")
    good = _stored(_int4(64, 128, 32), "p")
    assert quantized.load_weight(good, "p", "int4", 64, 128, cpu).shape == (64, 128)
    missing = {k: v for k, v in good.items() if not k.endswith("offset")}
    with pytest.raises(QuantizationError, match=r"p\.offset: missing"):
        quantized.load_weight(missing, "p", "int4", 64, 128, cpu)
    with pytest.raises(QuantizationError, match=r"p\.qweight: shape \(64, 64\), expected \(96, 64\)"):
        quantized.load_weight(good, "p", "int4", 96, 128, cpu)
    with pytest.raises(QuantizationError, match=r"p\.qweight: torch.int8, expected torch.uint8"):
        quantized.load_weight({**good, "p.qweight": good["p.qweight"].to(torch.int8)}, "p", "int4", 64, 128, cpu)
    with pytest.raises(QuantizationError, match="method 'int3' is unknown"):
        quantized.load_weight(good, "p", "int3", 64, 128, cpu)


def test_fp8_weights_refused_where_there_is_no_fp8():
    w = QuantizedWeight("fp8", torch.randn(32, 64).to(torch.float8_e4m3fn), torch.ones(32))
    with pytest.raises(QuantizationError, match="fp8 weights need a GPU with FP8"):
        quantized.load_weight(_stored(w, "p"), "p", "fp8", 32, 64, torch.device("cpu"))


@pytest.fixture(scope="module")
def int8_engine_dir(tmp_path_factory, smollm2_source):
    """A tiny random Llama built with int8 weights."""
    from tests.conftest import build_entry, save_tiny_model

    tmp = tmp_path_factory.mktemp("q-tiny")
    folder = save_tiny_model(tmp / "src", "llama", smollm2_source[1], seed=3)
    build_entry(tmp / "repo", str(folder), "tiny8", "--quantize", "int8")
    return tmp / "repo" / "tiny8" / "1" / "engine"


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_engine_loads_int8_folder_and_refuses_broken_ones(int8_engine_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from python_backend.engine.engine import Engine
    from python_backend.engine.sequence import SamplingParams

    engine = Engine.from_folder(int8_engine_dir, num_kv_blocks=16)
    assert isinstance(engine.model.layers[0].qkv_w, QuantizedWeight)
    assert engine.model.layers[0].qkv_w.method == "int8"
    [result] = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(result.token_ids) == 4

    truncated = _copy(int8_engine_dir, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(EngineFolderError, match="truncated"):
        open_engine_folder(truncated)

    missing = _copy(int8_engine_dir, tmp_path / "missing")
    tensors = load_file(str(missing / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.scale"]
    save_file(tensors, str(missing / "model.safetensors"))
    with pytest.raises(QuantizationError, match=r"model\.layers\.1\.mlp\.down_proj\.scale: missing"):
        Engine.from_folder(missing, num_kv_blocks=16)

    reshaped = _copy(int8_engine_dir, tmp_path / "reshaped")
    tensors = load_file(str(reshaped / "model.safetensors"))
    tensors["model.layers.0.self_attn.o_proj.qweight"] = tensors["model.layers.0.self_attn.o_proj.qweight"][
        :, :-8
    ].contiguous()
    save_file(tensors, str(reshaped / "model.safetensors"))
    with pytest.raises(QuantizationError, match=r"o_proj\.qweight: shape \(64, 56\), expected \(64, 64\)"):
        Engine.from_folder(reshaped, num_kv_blocks=16)

    unknown = _copy(int8_engine_dir, tmp_path / "unknown")
    meta = json.loads((unknown / "engine.json").read_text())
    meta["quantization"]["method"] = "int2"
    (unknown / "engine.json").write_text(json.dumps(meta))
    with pytest.raises(EngineFolderError, match="quantization method 'int2' is unknown"):
        open_engine_folder(unknown)


def test_int8_engine_logits_follow_the_dequantized_model(int8_engine_dir):
    """The engine's int8 forward pass equals a dense one over the dequantized weights."""
    from python_backend.engine.engine import Engine

    engine = Engine.from_folder(int8_engine_dir, num_kv_blocks=16)
    ids = list(range(10, 40))
    got = engine.prompt_logits(ids)
    model = engine.model
    for layer in model.layers:
        for field in ("qkv_w", "o_w", "gate_up_w", "down_w"):
            setattr(layer, field, getattr(layer, field).dequantize(model.dtype))
    model.lm_head = model.lm_head.dequantize(model.dtype)
    want = engine.prompt_logits(ids)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert F.cosine_similarity(got, want, dim=-1).min() > 0.9999
