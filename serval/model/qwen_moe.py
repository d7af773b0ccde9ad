"""Qwen2-MoE and Qwen3-MoE: the sparse-MoE decoder of mixtral.py with Qwen's switches.

    Qwen2-MoE: q/k/v bias; every MoE block adds a shared expert, out = experts(x) + sigmoid(gate_s(x)) * shared(x);
               top-k weights renormalized only if norm_topk_prob (false by default).
    Qwen3-MoE: no bias, per-head RMSNorm of q and k (as Qwen3), no shared expert, norm_topk_prob (true in the
               released checkpoints).
Both: layer i is sparse when i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0, a dense SwiGLU MLP
of intermediate_size otherwise; experts have moe_intermediate_size.
"""
from __future__ import annotations

from torch import nn

from serval.layers.mlp import GatedMLP
from serval.layers.moe import SparseMoeBlock
from serval.model.mixtral import MixtralForCausalLM, require_silu


def is_sparse_layer(config, layer_idx: int) -> bool:
    return (layer_idx not in (getattr(config, "mlp_only_layers", None) or []) and config.num_experts > 0
            and (layer_idx + 1) % getattr(config, "decoder_sparse_step", 1) == 0)


def qwen_moe_mlp(config, layer_idx: int) -> nn.Module:
    require_silu(config)
    if not is_sparse_layer(config, layer_idx):
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
    return SparseMoeBlock(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                          config.moe_intermediate_size, renormalize=bool(config.norm_topk_prob),
                          shared_expert_intermediate_size=getattr(config, "shared_expert_intermediate_size", 0),
                          weights_in_model_dtype=True)


class Qwen2MoeForCausalLM(MixtralForCausalLM):
    make_mlp = staticmethod(qwen_moe_mlp)

    def qkv_bias_of(self, config) -> bool:
        return bool(getattr(config, "qkv_bias", True))


class Qwen3MoeForCausalLM(MixtralForCausalLM):
    qk_norm = True
    make_mlp = staticmethod(qwen_moe_mlp)
