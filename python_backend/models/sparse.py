"""2:4 semi-structured sparse projections on GPUs with sparse tensor cores (compute capability 8.0+).

A 2:4-pruned weight keeps two of every four consecutive inputs. PyTorch compresses it to the kept
values plus 2-bit indices (`torch.sparse.to_sparse_semi_structured`, cuSPARSELt or CUTLASS) and
runs its matrix products at up to twice the dense rate. That pays where the product is
compute-bound, a prefill step's many rows; a decode step of a few rows is bound by reading the
weight, and the dense kernels with CUDA graphs do it well. So the dense weight is kept for steps
below `min_rows` rows, and `min_rows` 0 drops it: every step sparse, the weights in about 56% of
their dense bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# the sparse kernels' smallest tiles: a compressed weight's rows and columns must be multiples
_MIN_ROWS, _MIN_COLS = 32, 64


def supported(device: torch.device, dtype: torch.dtype) -> str | None:
    """None where 2:4 kernels can run here, else why not."""
    if device.type != "cuda":
        return "the semi-structured sparse kernels run on CUDA devices only"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "the GPU has no sparse tensor cores (compute capability 8.0 or newer is needed)"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"the sparse kernels take float16 or bfloat16 weights, not {dtype}"
    if not torch.backends.cusparselt.is_available():
        return "this PyTorch build has no cuSPARSELt"
    return None


def is_two_four(w: torch.Tensor) -> bool:
    """At most two non-zeros in every four consecutive weights of a row."""
    n, k = w.shape
    return k % 4 == 0 and bool(((w.reshape(n, k // 4, 4) != 0).sum(-1) <= 2).all())


@dataclass
class SparseWeight:
    """A weight [N, K] as a semi-structured sparse tensor; `linear` is F.linear(x, w, bias)."""

    sparse: torch.Tensor  # SparseSemiStructuredTensor
    dense: torch.Tensor | None  # for steps of fewer than min_rows rows
    min_rows: int
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, w: torch.Tensor, min_rows: int) -> SparseWeight:
        from torch.sparse import to_sparse_semi_structured

        n, k = w.shape
        if n % _MIN_ROWS or k % _MIN_COLS:
            raise ValueError(f"a {n}x{k} weight does not tile into the sparse kernels' {_MIN_ROWS}x{_MIN_COLS}")
        if not is_two_four(w):
            raise ValueError("the weight is not 2:4 sparse")
        return cls(to_sparse_semi_structured(w), w if min_rows > 0 else None, min_rows, (n, k))

    @property
    def read_bytes(self) -> int:
        """The packed values and their metadata: what a decode step below `min_rows` reads."""
        packed = self.sparse.packed
        meta = getattr(self.sparse, "meta", None)
        extra = 0 if meta is None else meta.numel() * meta.element_size()
        return packed.numel() * packed.element_size() + extra

    @property
    def num_bytes(self) -> int:
        dense = 0 if self.dense is None else self.dense.numel() * self.dense.element_size()
        return dense + self.read_bytes

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Row-major like F.linear's: the sparse product comes back transposed, and the kernels
        after a projection read rows."""
        if self.dense is not None and x.shape[0] < self.min_rows:
            return F.linear(x, self.dense, bias)
        return F.linear(x, self.sparse, bias).contiguous()


def sparsify(w: object, min_rows: int) -> object:
    """The weight as a SparseWeight where it is a dense 2:4 tensor that tiles; otherwise as it was
    (a quantized weight keeps its own product)."""
    if type(w) is not torch.Tensor and not isinstance(w, torch.nn.Parameter):
        return w
    try:
        return SparseWeight.from_dense(w, min_rows)
    except ValueError:
        return w
