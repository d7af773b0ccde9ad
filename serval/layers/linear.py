"""Linear layers that load Hugging Face checkpoints, including projections merged for fewer, larger matmuls.

q/k/v share one input and so do gate/up: one [sum(out), in] weight turns three (or two) small GEMMs into one,
which matters most at decode batch sizes where each GEMM is bandwidth-bound. A checkpoint stores the parts
separately; `load_shard` copies each into its rows. On a GPU a single half-precision row goes to the Triton GEMV
(SERVAL_GEMV=cublas: torch's matmul; SERVAL_GEMV=triton: the GEMV on CPU too, in Triton's interpreter).
`quantize_fp8_` turns a loaded layer's weight into float8 with per-channel scales (quantization="fp8"; the math
is in serval.layers.fp8); the model calls the layer the same either way.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from serval.layers import fp8
from serval.layers.activation import silu_and_mul

_GEMV_DTYPES = (torch.bfloat16, torch.float16)


class Linear(nn.Linear):
    """nn.Linear whose weights always come from a checkpoint or the dummy loader."""

    shard_names: tuple[str, ...] = ()

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        # [out_features] float32 once quantize_fp8_ has run (the weight is then float8 e4m3); None before.
        self.register_buffer("weight_scale", None)

    def quantize_fp8_(self) -> None:
        """Replace the weight by float8 e4m3 with one scale per output row (in place; done once, after loading)."""
        if self.weight_scale is not None:
            raise ValueError(f"{self!r} is already quantized")
        qweight, self.weight_scale = fp8.quantize_weight(self.weight)
        self.weight = nn.Parameter(qweight, requires_grad=False)

    def empty_fp8_(self) -> None:
        """Room for a checkpoint's float8 weight and per-row scales (filled by the model's load_weights)."""
        self.weight = nn.Parameter(torch.empty(self.weight.shape, dtype=fp8.FP8, device=self.weight.device),
                                   requires_grad=False)
        self.weight_scale = torch.empty(self.out_features, dtype=torch.float32, device=self.weight.device)

    def reset_parameters(self) -> None:
        # Kaiming init is overwritten by every load path and costs seconds on large models on CPU.
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _takes_gemv(x, self.in_features):
            from serval.kernels import triton_gemv
            out = triton_gemv.gemv(x, self.weight, self.bias, weight_scale=self.weight_scale)
            return out.view(*x.shape[:-1], self.out_features)
        if self.weight_scale is not None:
            return fp8.linear(x, self.weight, self.weight_scale, self.bias)
        return super().forward(x)

    def forward_silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """self(silu(gate) * up) of a merged gate/up output; for one row on a GPU, one fused GEMV."""
        if _takes_gemv(gate_up, 2 * self.in_features):
            from serval.kernels import triton_gemv
            out = triton_gemv.gemv(gate_up, self.weight, self.bias, gated=True, weight_scale=self.weight_scale)
            return out.view(*gate_up.shape[:-1], self.out_features)
        if self.weight_scale is not None:  # SwiGLU fused into the activation's quantization
            return fp8.linear(gate_up, self.weight, self.weight_scale, self.bias, gated=True)
        return self(silu_and_mul(gate_up))


def _takes_gemv(x: torch.Tensor, row_length: int) -> bool:
    """One row in half precision: batch-1 decode, where reading the weight is the whole cost and the Triton GEMV
    reads every projection faster than cuBLAS (serval.kernels.triton_gemv). On CUDA unless SERVAL_GEMV=cublas;
    SERVAL_GEMV=triton takes it on any device (on CPU, Triton's interpreter with TRITON_INTERPRET=1, as tests do)."""
    choice = os.environ.get("SERVAL_GEMV")
    wanted = choice == "triton" or (x.is_cuda and choice != "cublas")
    return wanted and x.dtype in _GEMV_DTYPES and x.numel() == row_length


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim: y = x @ [W_0; W_1; ...]^T."""

    def __init__(self, in_features: int, output_sizes: dict[str, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(output_sizes.values()), bias=bias)
        self.output_sizes = dict(output_sizes)
        self.shard_names = tuple(output_sizes)
        self.offsets: dict[str, int] = {}
        offset = 0
        for name, size in output_sizes.items():
            self.offsets[name] = offset
            offset += size

    def shard(self, param: torch.Tensor, name: str) -> torch.Tensor:
        """The rows of param (this layer's weight or bias) that projection `name` owns."""
        return param.narrow(0, self.offsets[name], self.output_sizes[name])

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return y.split(list(self.output_sizes.values()), dim=-1)


def qkv_linear(hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool) -> MergedLinear:
    return MergedLinear(hidden_size, {"q": num_heads * head_dim, "k": num_kv_heads * head_dim,
                                      "v": num_kv_heads * head_dim}, bias=bias)


def gate_up_linear(hidden_size: int, intermediate_size: int, bias: bool) -> MergedLinear:
    return MergedLinear(hidden_size, {"gate": intermediate_size, "up": intermediate_size}, bias=bias)
