"""The gated feed-forward block of GLU transformers (Shazeer, 2020): down(act(gate) * up).

gate and up are one merged projection (one GEMM instead of two). With SiLU (SwiGLU: Llama, Mistral, Qwen) the
activation is not a step of its own: the down projection applies it as it reads its input, in the Triton GEMV for
one row on a GPU and in the per-token quantization of a float8 layer (Linear.forward_silu_and_mul), so the
[tokens, intermediate] activation is never written to memory there. Other activations (Gemma's GeGLU) run
act_and_mul and then the projection.
"""
from __future__ import annotations

import torch
from torch import nn

from serval.layers.activation import get_act_and_mul, silu_and_mul
from serval.layers.linear import Linear, gate_up_linear


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = gate_up_linear(hidden_size, intermediate_size, bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)
        self.act_and_mul = get_act_and_mul(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.act_and_mul is silu_and_mul:
            return self.down_proj.forward_silu_and_mul(gate_up)
        return self.down_proj(self.act_and_mul(gate_up))
