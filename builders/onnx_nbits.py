"""Quantized projections in the exported graph: ONNX Runtime's `MatMulNBits` over the engine folder's
own codes, with nothing rounded again.

`MatMulNBits` (ONNX Runtime's com.microsoft domain) multiplies float activations by a weight [N, K]
stored as unsigned codes of `bits` bits in blocks of `block_size` along K, each block with a float
scale and a zero point: w = (q - zero) * scale. Its fast CPU kernels want integer zero points, and
run fastest with none given (8 for 4 bits, 128 for 8).

- int4: our codes are already packed two per byte with the even column in the low nibble, which is
  the operator's packing once K is cut into blocks. Our offsets are floats (the group's minimum, or a
  GGUF Q4_1 block's), which no integer zero point reproduces, so each weight is split exactly as
  w = (q - 8) * scale + c with c = offset + 8 * scale per block: the operator with its default zero
  point, plus a small float product of the activations' block sums with c ([N, K / block_size]).
  Symmetric codes (offset = -8 * scale) need no correction.
- int8: per-channel symmetric codes, shifted by 128 into unsigned ones (the operator's default zero
  point for 8 bits), the channel's scale repeated over blocks of the largest power of two dividing K.

Projections that read the same input (Q, K and V; gate and up) are concatenated into one product and
split after it: fewer, larger calls.

In PyTorch the product is a custom operator (`fastserve::matmul_nbits`) whose reference rebuilds the
weight in float32 and multiplies; the exporter translates it into those ONNX nodes. Its
`accuracy_level` picks ONNX Runtime's kernel: 0 multiplies in float32 (what the build compares with
the reference), 4 first quantizes each block of activations to int8, several times faster at one row
on CPUs, and is what the served graph uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SERVED_ACCURACY_LEVEL = 4  # int8 activations: ONNX Runtime's fast CPU kernels for 4- and 8-bit weights
EXACT_ACCURACY_LEVEL = 0  # float32 products: the graph compared with the reference


class NBitsError(ValueError):
    """Quantized weights that MatMulNBits cannot take as they are."""


@dataclass
class NBitsWeight:
    """One projection as MatMulNBits operands (default zero points) and an optional float correction
    per block: w = (q - 2**(bits-1)) * scale + correction."""

    packed: torch.Tensor  # uint8 [N, K / block_size, block_size * bits / 8]
    scales: torch.Tensor  # float32 [N * K / block_size]
    correction: torch.Tensor | None  # float32 [K / block_size, N]: c of each block, transposed
    bits: int
    block_size: int
    n: int
    k: int

    def dequantize(self) -> torch.Tensor:
        """The weight [N, K] as the graph computes it, in float32."""
        blocks = self.k // self.block_size
        if self.bits == 4:
            codes = torch.stack([self.packed & 0x0F, self.packed >> 4], dim=-1).reshape(self.n, blocks, -1)
        else:
            codes = self.packed.reshape(self.n, blocks, -1)
        w = (codes.float() - float(1 << (self.bits - 1))) * self.scales.reshape(self.n, blocks, 1)
        if self.correction is not None:
            w = w + self.correction.t().reshape(self.n, blocks, 1)
        return w.reshape(self.n, self.k)

    @property
    def num_bytes(self) -> int:
        extra = self.correction.numel() if self.correction is not None else 0
        return self.packed.numel() + 4 * (self.scales.numel() + extra)


def from_int4(qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> NBitsWeight:
    """Our int4 layout (codes [N, K/2], float16 scale and offset [N, K/G]) as MatMulNBits operands."""
    n, half = qweight.shape
    k, groups = 2 * half, scale.shape[1]
    g = k // groups
    s = scale.float()
    c = offset.float() + 8 * s
    correction = None if torch.all(c == 0) else c.t().contiguous()
    return NBitsWeight(
        qweight.reshape(n, groups, g // 2).contiguous(), s.reshape(-1).contiguous(), correction, 4, g, n, k
    )


def from_int8(qweight: torch.Tensor, scale: torch.Tensor) -> NBitsWeight:
    """Our int8 layout (int8 codes [N, K], a float scale per row) as 8-bit MatMulNBits operands."""
    n, k = qweight.shape
    block = min(k & -k, 256)  # the largest power of two dividing K
    if block < 16:
        raise NBitsError(f"MatMulNBits needs blocks of at least 16 columns; {k} columns allow {block}")
    blocks = k // block
    codes = (qweight.to(torch.int16) + 128).to(torch.uint8).reshape(n, blocks, block).contiguous()
    scales = scale.float().reshape(n, 1).expand(n, blocks).reshape(-1).contiguous()
    return NBitsWeight(codes, scales, None, 8, block, n, k)


def concatenate(weights: list[NBitsWeight]) -> NBitsWeight:
    """Projections of one input stacked along N (their outputs side by side)."""
    first = weights[0]
    if any((w.bits, w.block_size, w.k) != (first.bits, first.block_size, first.k) for w in weights):
        raise NBitsError("projections of one input differ in bits, block size or input size")
    corrections = [w.correction for w in weights]
    if all(c is None for c in corrections):
        correction = None
    else:
        blocks = first.k // first.block_size
        correction = torch.cat(
            [c if c is not None else torch.zeros(blocks, w.n) for c, w in zip(corrections, weights)], 1
        )
    return NBitsWeight(
        torch.cat([w.packed for w in weights]),
        torch.cat([w.scales for w in weights]),
        correction,
        first.bits,
        first.block_size,
        sum(w.n for w in weights),
        first.k,
    )


@torch.library.custom_op("fastserve::matmul_nbits", mutates_args=())
def matmul_nbits(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    correction: torch.Tensor,
    block_sum: torch.Tensor,
    n: int,
    k: int,
    bits: int,
    block_size: int,
    accuracy_level: int,
) -> torch.Tensor:
    """x [..., K] @ w^T with w rebuilt from the operands (an empty `correction`: none). The reference
    multiplies in float32 whatever the accuracy level; `block_sum` is the graph's way to the blocks'
    sums of x, the same here as a reshape."""
    c = correction if correction.numel() else None
    return x @ NBitsWeight(packed, scales, c, bits, block_size, n, k).dequantize().t()


@matmul_nbits.register_fake
def _(x, packed, scales, correction, block_sum, n, k, bits, block_size, accuracy_level):
    return x.new_empty((*x.shape[:-1], n))


def block_sum_matrix(k: int, block_size: int) -> torch.Tensor:
    """[K, K / block_size] of ones and zeros: x @ it sums x over each block."""
    return torch.eye(k // block_size).repeat_interleave(block_size, dim=0)


def _matmul_nbits_schema():
    """MatMulNBits' signature as ONNX Runtime defines it (the inputs used here): the exporter builds
    nodes from a schema, and the onnx package knows only the standard domain's."""
    from onnx.defs import OpSchema

    p, a = OpSchema.FormalParameter, OpSchema.Attribute
    return OpSchema(
        "MatMulNBits",
        "com.microsoft",
        1,
        inputs=[p("A", "T1"), p("B", "T2"), p("scales", "T1")],
        outputs=[p("Y", "T1")],
        type_constraints=[
            ("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
            ("T2", ["tensor(uint8)", "tensor(int32)"], ""),
        ],
        attributes=[
            a("K", OpSchema.AttrType.INT, "", required=True),
            a("N", OpSchema.AttrType.INT, "", required=True),
            a("bits", OpSchema.AttrType.INT, "", required=True),
            a("block_size", OpSchema.AttrType.INT, "", required=True),
            a("accuracy_level", OpSchema.AttrType.INT, "", required=False),
        ],
    )


def _is_empty(value) -> bool:
    """Whether the exporter's value is an empty buffer (its shape is static)."""
    shape = getattr(value, "shape", None)
    return shape is not None and len(shape) == 1 and shape[0] == 0


def translation_table() -> dict:
    """The exporter's translation of fastserve::matmul_nbits: MatMulNBits, and where there is a
    correction, MatMul(MatMul(x, block_sum), correction) added to it."""
    import onnxscript
    from onnxscript import opset18 as op

    msft = onnxscript.values.Opset("com.microsoft", 1)
    nbits = onnxscript.values.Op(msft, "MatMulNBits", _matmul_nbits_schema())

    def to_onnx(
        x, packed, scales, correction, block_sum, n: int, k: int, bits: int, block_size: int, accuracy_level: int
    ):
        y = nbits(x, packed, scales, K=k, N=n, bits=bits, block_size=block_size, accuracy_level=accuracy_level)
        if _is_empty(correction):
            return y
        return op.Add(y, op.MatMul(op.MatMul(x, block_sum), correction))

    return {torch.ops.fastserve.matmul_nbits.default: to_onnx}


class NBitsLinear(torch.nn.Module):
    """A projection over MatMulNBits operands, with an optional float bias. `block_sum` is shared by
    the projections of one input size, so the graph holds one copy."""

    def __init__(self, weight: NBitsWeight, bias: torch.Tensor | None, accuracy_level: int, block_sum: torch.Tensor):
        super().__init__()
        self.n, self.k, self.bits, self.block_size = weight.n, weight.k, weight.bits, weight.block_size
        self.accuracy_level = accuracy_level
        self.register_buffer("packed", weight.packed)
        self.register_buffer("scales", weight.scales)
        empty = torch.zeros(0)
        self.register_buffer("correction", weight.correction if weight.correction is not None else empty)
        self.register_buffer("block_sum", block_sum if weight.correction is not None else empty)
        self.bias = None if bias is None else torch.nn.Parameter(bias.float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = matmul_nbits(
            x,
            self.packed,
            self.scales,
            self.correction,
            self.block_sum,
            self.n,
            self.k,
            self.bits,
            self.block_size,
            self.accuracy_level,
        )
        return y if self.bias is None else y + self.bias
