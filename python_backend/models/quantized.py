"""Quantized weights as the engine serves them: the on-disk layout, the checks made when loading it,
and the matrix product each one runs on each device.

Every method stores the codes and the scales to rebuild the weight, never a dequantized copy:

- `int8`: `qweight` int8 [N, K] and `scale` [N]; w = q * scale (per output channel, symmetric).
- `int4`: `qweight` uint8 [N, K/2] (two codes per byte, the even column in the low nibble), `scale`
  and `offset` [N, K/G]; w = q * scale + offset for the G weights of a group. One layout serves the
  asymmetric case (offset = the group's minimum), the symmetric one (offset = -8 * scale) and
  llama.cpp's Q4_0/Q4_1 blocks, whose codes and float16 scales it holds exactly.
- `fp8`: `qweight` float8_e4m3fn [N, K] and `scale` [N] or [1]; activations are scaled per row when
  they are multiplied, so both operands of the product are E4M3.

Products: on the CPU PyTorch's packed weight-only kernels (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`) for bfloat16 and float16 activations, the dense weight for float32
ones; on a GPU, for decode steps, whichever start-up timing picks of our
Triton kernels (a GEMV for a few rows, a tensor-core GEMM that dequantizes tile by tile for
batches) and, for int4 with bfloat16 activations, PyTorch's own CUDA kernel (`_weight_int4pack_mm`,
the "tinygemm" kernel torchao's int4 weight-only path runs); for prefills the weight dequantized
into a scratch buffer and multiplied by cuBLAS; FP8 through `torch._scaled_mm`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

METHODS = ("int8", "int4", "fp8")
GEMV_MAX_ROWS = 4  # untuned, beyond this a step is a small GEMM: dequantize and use cuBLAS


class QuantizationError(ValueError):
    """A quantized folder the engine cannot serve; the message names the tensor and what is wrong."""


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> codes 0..15 as uint8 [N, K]."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [N, K] (K even) -> uint8 [N, K/2]."""
    c = codes.to(torch.uint8).reshape(codes.shape[0], -1, 2)
    return c[..., 0] | (c[..., 1] << 4)


def fp8_supported(device: torch.device) -> bool:
    """FP8 matrix products need compute capability 8.9 (Ada) or 9.0 (Hopper) and later."""
    if device.type != "cuda" or not hasattr(torch, "float8_e4m3fn"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


@dataclass
class QuantizedWeight:
    """A weight [N, K] in one of METHODS. `linear` is F.linear(x, w, bias) for it."""

    method: str
    qweight: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None = None
    _layouts: dict = field(default_factory=dict, repr=False)  # other kernels' layouts of the codes, made once
    gemv: dict = field(default_factory=dict, repr=False)  # GPU: tuned rows -> our kernel's config, or None (dense)

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.qweight.shape
        return (n, k * 2) if self.method == "int4" else (n, k)

    @property
    def group_size(self) -> int:
        return self.shape[1] // self.scale.shape[1] if self.method == "int4" else self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def read_bytes(self) -> int:
        """One copy of the codes and scales: what a step that reads this weight once reads, whichever
        kernel's layout it reads them in."""
        parts = [self.qweight, self.scale] + ([self.offset] if self.offset is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)

    @property
    def num_bytes(self) -> int:
        """Everything held in memory: the codes, and every other kernel's layout of them."""
        parts = [self.qweight, self.scale] + ([self.offset] if self.offset is not None else [])
        for layout in self._layouts.values():
            parts += list(layout) if isinstance(layout, tuple) else [layout]
        return sum(t.numel() * t.element_size() for t in parts)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K] these codes stand for, computed in float32."""
        if self.method == "int8":
            w = self.qweight.float() * self.scale.float()[:, None]
        elif self.method == "int4":
            g = self.group_size
            q = unpack_int4(self.qweight).float()
            w = q * self.scale.float().repeat_interleave(g, 1) + self.offset.float().repeat_interleave(g, 1)
        else:
            w = self.qweight.float() * self.scale.float().reshape(-1, 1)
        return w.to(dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None, dense: bool = False) -> torch.Tensor:
        """On a GPU, a step's rows go through our GEMV or tensor-core GEMM where start-up tuning chose
        them for the smallest tuned row count that holds them (untuned: the GEMV up to GEMV_MAX_ROWS
        rows, not fp8); other steps, or `dense`, through the dense path: FP8's scaled matrix product,
        or the weight dequantized and cuBLAS."""
        if self.device.type == "cpu":
            y = self._linear_cpu(x)
        else:
            from python_backend.ops import quant_gemv

            config = None if dense else self._config_for(x.shape[0])
            if config is not None:
                y = quant_gemv.run(x, self, config)
            elif self.method == "fp8":
                y = self._linear_fp8(x)
            else:
                y = F.linear(x, quant_gemv.dequantize(self, x.dtype))
        return y if bias is None else y + bias

    def _config_for(self, rows: int):
        """Our kernel's configuration for a step of `rows` rows, or None for the dense path."""
        if self.gemv:
            fits = [r for r in self.gemv if rows <= r]
            return self.gemv[min(fits)] if fits else None
        if rows <= GEMV_MAX_ROWS and self.method != "fp8":
            from python_backend.ops.quant_gemv import QuantGemvConfig, gemv_takes

            return QuantGemvConfig() if gemv_takes(self) else None
        return None

    def _linear_cpu(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self._layouts.get(x.dtype)
        if kernel is None:
            kernel = self._layouts[x.dtype] = self._cpu_layout(x.dtype)
        if self.method == "int8" and kernel.dim() == 1:
            return torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.qweight, kernel)
        if self.method == "int4" and isinstance(kernel, tuple):
            packed, scales_and_zeros = kernel
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, self.group_size, scales_and_zeros)
        return F.linear(x, kernel)

    def _cpu_layout(self, dtype: torch.dtype):
        """The operands of PyTorch's CPU kernel for activations of `dtype`: the scales (int8); the packed
        codes and the (scale, zero) pairs of w = (q - 8) * scale + zero (int4); or, where the kernel
        does not take this shape or these activations, the dequantized weight. Both kernels are
        fast for bfloat16 and float16 only: with float32 activations they run 5 to 80 times slower
        than the dense product, so a float32 build holds its weights dequantized, made on first use."""
        if dtype == torch.float32:
            return self.dequantize(dtype)
        if self.method == "int8":
            return self.scale.to(dtype)
        if self.method == "int4" and _int4_kernel_takes(self.shape, self.group_size):
            codes = unpack_int4(self.qweight).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            scale = self.scale.float()
            zero = self.offset.float() + 8 * scale
            return packed, torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()
        return self.dequantize(dtype)

    def tinygemm(self, x: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
        """x (bfloat16, on a GPU) through PyTorch's CUDA int4 kernel: w = (q - 8) * scale + zero, the
        codes retiled for it once (a second copy of the codes beside ours, which prefills and our
        kernels read) and the (scale, zero) pairs in bfloat16."""
        key = ("tinygemm", inner_k_tiles)
        layout = self._layouts.get(key)
        if layout is None:
            swapped = (self.qweight >> 4) | (self.qweight << 4)  # its packing takes the even column high
            packed = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), inner_k_tiles)
            scale = self.scale.float()
            zero = self.offset.float() + 8 * scale
            pairs = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
            layout = self._layouts[key] = (packed, pairs)
        packed, pairs = layout
        return torch.ops.aten._weight_int4pack_mm(x.contiguous(), packed, self.group_size, pairs)

    def drop_unused_layouts(self) -> None:
        """Free the GPU kernels' layouts that start-up timing tried but chose for no row count."""
        from python_backend.ops.quant_gemv import TinyGemmConfig

        used = {("tinygemm", c.inner_k_tiles) for c in self.gemv.values() if isinstance(c, TinyGemmConfig)}
        for key in [k for k in self._layouts if isinstance(k, tuple) and k not in used]:
            del self._layouts[key]

    def _linear_fp8(self, x: torch.Tensor) -> torch.Tensor:
        """Both operands in E4M3: x scaled per row by its own absolute maximum (one kernel,
        ops/fp8_rows.py), padded to the GEMM's multiple of 16 rows."""
        from python_backend.ops.fp8_rows import fp8_rows

        rows = x.reshape(-1, x.shape[-1])
        xq, x_scale = fp8_rows(rows)
        n, m = self.shape[0], rows.shape[0]
        w_scale = self.scale.float().reshape(1, -1).expand(1, n).contiguous()  # a view, per channel
        y = torch._scaled_mm(xq, self.qweight.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16)
        return (y[:m] if xq.shape[0] != m else y).to(x.dtype)

    def to(self, device: torch.device) -> QuantizedWeight:
        move = lambda t: None if t is None else t.to(device)
        return QuantizedWeight(self.method, move(self.qweight), move(self.scale), move(self.offset))


def _int4_kernel_takes(shape: tuple[int, int], group_size: int) -> bool:
    n, k = shape
    return group_size in (32, 64, 128, 256) and k % group_size == 0 and n % 64 == 0 and k % 64 == 0


def concat(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """Weights that share an input (Q, K and V; gate and up) stacked along N, as the model fuses them."""
    first = weights[0]
    if any(w.method != first.method or w.shape[1] != first.shape[1] for w in weights):
        raise QuantizationError("fused projections must share the quantization method and input size")
    if first.method == "int4" and any(w.group_size != first.group_size for w in weights):
        raise QuantizationError("fused int4 projections must share the group size")
    if first.method == "fp8" and any(w.scale.numel() == 1 for w in weights):
        scales = [w.scale.float().reshape(-1).expand(w.shape[0]) for w in weights]
    else:
        scales = [w.scale for w in weights]
    offset = torch.cat([w.offset for w in weights]) if first.method == "int4" else None
    return QuantizedWeight(first.method, torch.cat([w.qweight for w in weights]), torch.cat(scales), offset)


def expected_shapes(method: str, n: int, k: int, group_size: int | None) -> dict[str, tuple[int, ...]]:
    """The stored tensors of one [N, K] weight (fp8's scale may also be [1], per tensor)."""
    if method == "int8":
        return {"qweight": (n, k), "scale": (n,)}
    if method == "int4":
        groups = k // group_size
        return {"qweight": (n, k // 2), "scale": (n, groups), "offset": (n, groups)}
    return {"qweight": (n, k), "scale": (n,)}


_DTYPES = {
    "int8": (torch.int8,),
    "int4": (torch.uint8,),
    "fp8": tuple(d for d in (getattr(torch, "float8_e4m3fn", None),) if d is not None),
}


def load_weight(
    tensors: dict[str, torch.Tensor], name: str, method: str, n: int, k: int, device: torch.device
) -> QuantizedWeight:
    """The quantized weight stored under `name` (e.g. model.layers.0.mlp.down_proj), checked against
    the shape the model config gives it."""
    if method not in METHODS:
        raise QuantizationError(f"quantization method {method!r} is unknown; this engine serves {', '.join(METHODS)}")
    parts = {}
    for part in ("qweight", "scale", "offset") if method == "int4" else ("qweight", "scale"):
        key = f"{name}.{part}"
        if key not in tensors:
            raise QuantizationError(f"{key}: missing from the quantized weights ({method})")
        parts[part] = tensors[key]
    if parts["qweight"].dtype not in _DTYPES[method]:
        raise QuantizationError(f"{name}.qweight: {parts['qweight'].dtype}, expected {_DTYPES[method][0]} ({method})")
    group = None
    if method == "int4":
        groups = parts["scale"].shape[-1] if parts["scale"].dim() == 2 else 0
        if groups == 0 or k % groups:
            raise QuantizationError(f"{name}.scale: shape {tuple(parts['scale'].shape)} has no group size for K={k}")
        group = k // groups
    want = expected_shapes(method, n, k, group)
    for part, tensor in parts.items():
        shape = tuple(tensor.shape)
        if shape != want[part] and not (method == "fp8" and part == "scale" and shape == (1,)):
            raise QuantizationError(f"{name}.{part}: shape {shape}, expected {want[part]} for a [{n}, {k}] weight")
    if method == "fp8" and not fp8_supported(device):
        raise QuantizationError(
            f"fp8 weights need a GPU with FP8 matrix units (compute capability 8.9 or later); this engine runs on "
            f"{_describe(device)}. Build with --quantize int8 or int4 for it."
        )
    return QuantizedWeight(method, *(parts[p].to(device) for p in parts))


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    return "the CPU"
