"""Linear layers that load Hugging Face checkpoints, including projections merged for fewer, larger matmuls.

q/k/v share one input and so do gate/up: one [sum(out), in] weight turns three (or two) small GEMMs into one,
which matters most at decode batch sizes where each GEMM is bandwidth-bound. A checkpoint stores the parts
separately; `load_shard` copies each into its rows. Quantization (later) replaces these modules; the model
only calls them.
"""
from __future__ import annotations

import torch
from torch import nn


class Linear(nn.Linear):
    """nn.Linear whose weights always come from a checkpoint or the dummy loader."""

    shard_names: tuple[str, ...] = ()

    def reset_parameters(self) -> None:
        # Kaiming init is overwritten by every load path and costs seconds on large models on CPU.
        pass


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
