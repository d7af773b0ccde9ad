"""Programmatic dependent launch (Hopper and later): a kernel launched with it may start while the kernel before it
finishes, and waits (griddepcontrol.wait, `gdc_wait`) only where it first needs that kernel's results.

Why: a batch-1 decode step is some three hundred short kernels in a row, replayed from a CUDA graph; between two
of them the GPU drains one grid and ramps up the next, a microsecond or two each time with nothing read from
memory. With this, the next grid is already resident when the previous one ends, and the GEMVs start reading their
weights, which no earlier kernel writes, before waiting for their input vector.

Every kernel that takes USE_PDL must call `wait` before its first read of an earlier kernel's output and before
its first write (an earlier kernel may still read memory the allocator hands out again). SERVAL_PDL=0 turns it off.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@functools.cache
def _supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def enabled(tensor: torch.Tensor) -> bool:
    """Launch kernels on tensor's device with programmatic dependent launch?"""
    return (tensor.is_cuda and os.environ.get("SERVAL_PDL", "1") != "0"
            and os.environ.get("TRITON_INTERPRET") != "1" and _supported(tensor.device.index or 0))


def launch_options(tensor: torch.Tensor) -> dict:
    """Keyword arguments for a kernel launch: USE_PDL for the kernel, and launch_pdl for Triton's launcher."""
    use = enabled(tensor)
    return {"USE_PDL": use, "launch_pdl": True} if use else {"USE_PDL": False}


@triton.jit
def wait(USE_PDL: tl.constexpr):
    """Let the next kernel launch now, then wait until the previous one has finished and its writes are visible."""
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
