"""Phi-3 (and Phi-3.5, Phi-4-mini): the Llama decoder with the checkpoint's projections already fused.

    h = x + Attn(RMSNorm(x));  out = h + MLP(RMSNorm(h))          (Abdin et al., 2024)

The checkpoint stores q/k/v as one `qkv_proj` ([q; k; v] rows) and gate/up as one `gate_up_proj` ([gate; up]
rows), the layout Serval's merged layers use: at load each is cut into its parts and handed to the Llama loader,
which copies every part into its rows and reports any that is missing or mis-shaped by its own name.
What differs in the forward pass lives in the rotary embedding the config asks for: LongRoPE (short and long
factors; serval.layers.rotary says which positions use which) and partial rotary (Phi-4-mini).
`sliding_window`, when a config sets it, applies to every layer, as transformers applies it.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from serval.model.llama import LlamaForCausalLM, head_dim_of

# A fused checkpoint projection -> the parts it stacks along its rows, in order.
_FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class Phi3ForCausalLM(LlamaForCausalLM):
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._unfused(weights))

    def _unfused(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            parts = name.split(".")
            if len(parts) < 2 or parts[-2] not in _FUSED_PROJECTIONS:
                yield name, tensor
                continue
            sizes = self._part_sizes(parts[-2])
            if tensor.shape[0] != sum(sizes):
                raise ValueError(f"weight {name!r} has {tensor.shape[0]} rows; the model (from config.json) expects "
                                 f"{sum(sizes)} ({' + '.join(map(str, sizes))})")
            for part, rows in zip(_FUSED_PROJECTIONS[parts[-2]], tensor.split(sizes)):
                yield ".".join(parts[:-2] + [part, parts[-1]]), rows

    def _part_sizes(self, fused: str) -> list[int]:
        config = self.config
        if fused == "gate_up_proj":
            return [config.intermediate_size, config.intermediate_size]
        head_dim = head_dim_of(config)
        return [config.num_attention_heads * head_dim] + [config.num_key_value_heads * head_dim] * 2
