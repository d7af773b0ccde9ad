"""Mixtral (Jiang et al., 2024): the Llama decoder with its MLP replaced by a sparse mixture of experts.

    h = x + Attn(RMSNorm(x));  out = h + MoE(RMSNorm(h))
    MoE: router softmax over all E experts, top k (2 of 8) renormalized, each a SwiGLU MLP (serval.layers.moe)

This file is the sparse-MoE decoder for the families built the same way; qwen_moe.py flips its switches for
Qwen2-MoE (q/k/v bias, a shared expert, dense layers by decoder_sparse_step / mlp_only_layers) and Qwen3-MoE (q/k
norm). Attention is Llama's (serval.model.llama.LlamaAttention); experts and routing are serval.layers.moe's, which
also picks the fused Triton kernel on CUDA and the torch reference elsewhere.

Checkpoints: experts come per expert (Mixtral's `block_sparse_moe.experts.N.w1/w2/w3`, Qwen's
`mlp.experts.N.gate_proj/up_proj/down_proj`) or stacked as transformers 5 writes them with
save_original_format=False (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]); both
land in the stacked parameters (serval.model.loader.expert_weight_slices names the parts).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from serval.layers.linear import MergedLinear
from serval.layers.moe import FusedMoE, SparseMoeBlock
from serval.model.llama import LlamaForCausalLM
from serval.model import loader  # the module, not its names: loader imports the registry, which imports us

# Checkpoint projection name -> (our merged module, its shard), for attention and dense/shared-expert MLPs.
_MERGED_PROJECTIONS = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
}


class MixtralForCausalLM(LlamaForCausalLM):
    """Llama's model with a sparse MoE block as each layer's feed-forward; Qwen2/3-MoE (qwen_moe.py) flip the
    switches. Its own load_weights: experts are parts of stacked parameters."""

    @staticmethod
    def make_mlp(config, layer_idx: int) -> nn.Module:
        require_silu(config)
        return SparseMoeBlock(config.hidden_size, config.num_local_experts, config.num_experts_per_tok,
                              config.intermediate_size, renormalize=True)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the model; raise naming any unknown, mis-shaped or missing weight.
        Each expert's projection is a part of a stacked parameter (FusedMoE.shard)."""
        params = dict(self.named_parameters())
        expected = {(name, shard) for name in params for shard in self._load_shards_of(name)}
        loaded: set = set()
        unknown: list[str] = []
        for hf_name, whole in weights:
            if "rotary_emb." in hf_name:  # inv_freq and cos/sin caches of older checkpoints: recomputed here
                continue
            for slice_name, name, shard, tensor in self._parts(hf_name, whole):
                if name not in params:
                    unknown.append(slice_name)
                    continue
                param = params[name]
                target = param.data if shard is None else self._module_of(name).shard(param.data, shard)
                if target.shape != tensor.shape:
                    raise ValueError(f"weight {slice_name!r} has shape {tuple(tensor.shape)}; the model (from "
                                     f"config.json) expects {tuple(target.shape)}")
                target.copy_(tensor)
                loaded.add((name, shard))
        missing = sorted(self._hf_name(name, shard) for name, shard in expected - loaded)
        if unknown or missing:
            raise ValueError(f"checkpoint does not match {type(self).__name__}: "
                             f"unknown weights {_preview(unknown)}, missing weights {_preview(missing)}")

    def _parts(self, hf_name: str, tensor: torch.Tensor):
        """(checkpoint name, our parameter, shard, tensor) for each part of the model one checkpoint tensor fills."""
        experts = loader.expert_weight_slices(hf_name, tensor)
        if experts is not None:
            return [(s.checkpoint_name, s.name, (s.expert, s.projection), s.tensor) for s in experts]
        hf_name = hf_name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's original name for the MoE block
        if self.tie_word_embeddings and hf_name == "lm_head.weight":
            return [(hf_name, "model.embed_tokens.weight", None, tensor)]
        parts = hf_name.split(".")
        if len(parts) >= 2 and parts[-2] in _MERGED_PROJECTIONS:
            merged, shard = _MERGED_PROJECTIONS[parts[-2]]
            return [(hf_name, ".".join(parts[:-2] + [merged, parts[-1]]), shard, tensor)]
        return [(hf_name, hf_name, None, tensor)]

    def _load_shards_of(self, param_name: str) -> list:
        module = self._module_of(param_name)
        if isinstance(module, FusedMoE):
            return module.shard_names(param_name.rsplit(".", 1)[1])
        return list(self._shards_of(param_name))

    # The names transformers' own modules use (what benchmarks/gpu_suite.py shares weights under): experts stacked.
    def _shards_of(self, param_name: str) -> tuple[str | None, ...]:
        module = self._module_of(param_name)
        return module.shard_names if isinstance(module, MergedLinear) else (None,)

    def _hf_name(self, name: str, shard) -> str:
        if shard is None:
            return name
        if isinstance(shard, tuple):  # (expert, projection) of a stacked expert weight
            expert, projection = shard
            return f"{name.rsplit('.', 1)[0]}.{expert}.{projection}_proj.weight"
        merged = name.split(".")[-2]
        projection = next(p for p, (m, s) in _MERGED_PROJECTIONS.items() if m == merged and s == shard)
        return name.replace(f".{merged}.", f".{projection}.")

    def _module_of(self, param_name: str) -> nn.Module:
        return self.get_submodule(param_name.rsplit(".", 1)[0])


def require_silu(config) -> None:
    """The experts are SwiGLU (the fused kernel has SiLU built in)."""
    if config.hidden_act != "silu":
        raise ValueError(f"hidden_act {config.hidden_act!r} is not supported for mixture-of-experts layers; "
                         "supported: ['silu']")


def _preview(names: list[str], limit: int = 8) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return f"[{shown}{f', ... ({len(names) - limit} more)' if len(names) > limit else ''}]"
