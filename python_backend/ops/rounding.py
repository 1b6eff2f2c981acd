"""Rounding to the model's dtype inside Triton kernels, in a form the compiler keeps.

PyTorch rounds every bfloat16 op's result to bfloat16; our fused kernels reproduce that with
`x.to(bf16).to(fp32)` round trips, so that greedy choices at near-ties match transformers. But the
compiler may fold such round trips away (Triton 3.6 does for Hopper), leaving products unrounded and
one bfloat16 step off PyTorch's. `rounded` does the bfloat16 rounding (to nearest, ties to even) on
the bits, which no compiler pass can fold.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rounded(x, dtype: tl.constexpr):
    """float32 x rounded to `dtype` and returned as float32 (NaN and overflow are not special-cased:
    the values here are activations)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)
