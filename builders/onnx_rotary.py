"""Rotary position embedding as one ONNX Runtime node (com.microsoft RotaryEmbedding).

Written with plain operators, rotating Q and K takes some sixteen small nodes per layer (gathers of
the tables, slices, a negation, a concatenation, products and sums); on the CPU each costs a few
microseconds of dispatch, which at SmolLM2's size is a sizeable part of a decode step. The graph
for ONNX Runtime calls its contrib operator instead; a graph meant for other parsers (TensorRT)
keeps the plain form. In PyTorch the rotation is a custom operator whose reference is the usual
x * cos + rotate_half(x) * sin.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("fastserve::rotary", mutates_args=())
def rotary(
    x: torch.Tensor, position_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """x [b, s, heads * head_dim] rotated at position_ids [b, s]; cos and sin [positions, head_dim / 2]
    (the halves rotate together, as in Llama's transformers code)."""
    b, s, width = x.shape
    hd = width // num_heads
    xh = x.reshape(b, s, num_heads, hd)
    c = torch.cat([cos, cos], dim=-1)[position_ids].unsqueeze(2)  # [b, s, 1, hd]
    sn = torch.cat([sin, sin], dim=-1)[position_ids].unsqueeze(2)
    half = hd // 2
    rotated = torch.cat([-xh[..., half:], xh[..., :half]], dim=-1)
    return (xh * c + rotated * sn).reshape(b, s, width)


@rotary.register_fake
def _(x, position_ids, cos, sin, num_heads):
    return torch.empty_like(x)


def _rotary_schema():
    """RotaryEmbedding's signature as ONNX Runtime defines it (the exporter needs a schema)."""
    from onnx.defs import OpSchema

    p, a = OpSchema.FormalParameter, OpSchema.Attribute
    return OpSchema(
        "RotaryEmbedding",
        "com.microsoft",
        1,
        inputs=[p("input", "T"), p("position_ids", "M"), p("cos_cache", "T"), p("sin_cache", "T")],
        outputs=[p("output", "T")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
            ("M", ["tensor(int64)"], ""),
        ],
        attributes=[
            a("interleaved", OpSchema.AttrType.INT, "", required=False),
            a("num_heads", OpSchema.AttrType.INT, "", required=False),
        ],
    )


def translation_table() -> dict:
    import onnxscript

    msft = onnxscript.values.Opset("com.microsoft", 1)
    node = onnxscript.values.Op(msft, "RotaryEmbedding", _rotary_schema())

    def to_onnx(x, position_ids, cos, sin, num_heads: int):
        return node(x, position_ids, cos, sin, interleaved=0, num_heads=num_heads)

    return {torch.ops.fastserve.rotary.default: to_onnx}
