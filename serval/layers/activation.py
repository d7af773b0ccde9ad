"""Gated activations for merged gate/up projections: act(gate) * up, the GLU variants of Shazeer (2020)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU. x is [..., 2 * I]: gate in the first half, up in the second (the merged projection's layout)."""
    if x.is_cuda:  # one fused kernel (serval.kernels.triton_fused); this function is its reference
        from serval.kernels import triton_fused
        return triton_fused.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """GeGLU with the tanh approximation (Gemma's gelu_pytorch_tanh)."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


_ACT_AND_MUL: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": silu_and_mul,
    "gelu_pytorch_tanh": gelu_tanh_and_mul,
}


def get_act_and_mul(hidden_act: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The act-and-mul function for a config's hidden_act."""
    if hidden_act not in _ACT_AND_MUL:
        raise ValueError(f"hidden_act {hidden_act!r} is not supported; supported: {sorted(_ACT_AND_MUL)}")
    return _ACT_AND_MUL[hidden_act]
