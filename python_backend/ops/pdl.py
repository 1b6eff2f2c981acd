"""Programmatic dependent launch (Hopper and later): a kernel starts before the one ahead of it has
finished, does the work that does not depend on it, then waits.

A single sequence's decode step is a chain of about a hundred short kernels; each one's launch, ramp
and tail leave gaps in which HBM idles. With PDL a projection issues the loads of its weights (which
no kernel writes) while the kernel before it drains, and waits (`griddepcontrol.wait`) only before it
reads that kernel's output. Every kernel launched this way must call `wait_for_previous` before
touching anything an earlier kernel wrote, and writes nothing before it.

Opt-in (FASTSERVE_PDL=1), because it does not pay: a graphed one-sequence step is no faster with it
(if anything slightly slower). The greedy tokens are the same either way
(tests/python_backend/engine/test_cuda_graphs.py). Never on CPUs or in Triton's interpreter.
"""

from __future__ import annotations

import os
from functools import cache

import torch
import triton
import triton.language as tl

try:  # the intrinsics and the launch option came with newer Triton releases than our lowest (3.2)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    AVAILABLE = True
except ImportError:
    AVAILABLE = False

    @triton.jit
    def gdc_launch_dependents():
        pass

    @triton.jit
    def gdc_wait():
        pass


@cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: asked for, supported by this Triton, CUDA, compute
    capability 9 or later, compiled."""
    if (
        not AVAILABLE
        or device.type != "cuda"
        or os.environ.get("TRITON_INTERPRET") == "1"
        or os.environ.get("FASTSERVE_PDL") != "1"
    ):
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def launch(use: bool) -> dict:
    """The launch option for a kernel call: none at all without PDL, so that Triton releases that
    do not know the option still launch the kernel."""
    return {"launch_pdl": True} if use else {}


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """Let the next kernel launch (it too waits before reading what this one writes), then wait for
    the previous kernel to finish and its writes to be visible."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
