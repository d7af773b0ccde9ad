"""DeepSeek-V3 (DeepSeek-AI, 2024): multi-head latent attention and a fine-grained mixture of experts.

    h = x + MLA(RMSNorm(x));  out = h + FFN(RMSNorm(h))
    MLA: q = W_UQ RMSNorm(W_DQ x) (or one q_proj when q_lora_rank is None), split per head into a no-rope part
         and a rope part; the key/value latent c = RMSNorm(W_DKV x) and the shared rope key k_pe = RoPE(W_KR x)
         are what the cache keeps (serval.layers.mla); softmax scale 1/sqrt(nope + rope), times YaRN's mscale^2
         when rope scaling says mscale_all_dim
    FFN: the first `first_k_dense_replace` layers are a dense SwiGLU MLP; the others route each token to
         num_experts_per_tok of n_routed_experts SwiGLU experts by sigmoid scores, group-limited (topk_group of
         n_group groups) and steered by e_score_correction_bias, weights renormalized and times
         routed_scaling_factor, plus n_shared_experts shared experts every token goes through

RoPE pairs are interleaved in DeepSeek's checkpoints (rope_interleave): (x0, x1), (x2, x3), ... are rotated
together; they are de-interleaved before the rotate-half rotation, which gives transformers' numbers. Multi-token
prediction layers (layer indices past num_hidden_layers in the released checkpoints) are skipped at load.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from serval.layers.attention import AttentionMetadata
from serval.layers.embedding import Embedding
from serval.layers.linear import Linear
from serval.layers.mla import LatentDims, latent_attention, latent_cache_shape, write_latent
from serval.layers.mlp import GatedMLP
from serval.layers.moe import FusedMoE, sigmoid_group_top_k
from serval.layers.norm import RMSNorm
from serval.layers.rotary import RotaryEmbedding, rope_parameters, yarn_mscale
from serval.model.llama import LlamaDecoderLayer, LlamaModel
from serval.model.mixtral import MixtralForCausalLM, require_silu

_LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm and kv_a_layernorm with the default, not rms_norm_eps


def latent_dims(config) -> LatentDims:
    return LatentDims(config.num_attention_heads, config.kv_lora_rank, config.qk_nope_head_dim,
                      config.qk_rope_head_dim, config.v_head_dim)


def softmax_scale(config) -> float:
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = rope_parameters(config)
    if params["rope_type"] != "default" and params.get("mscale_all_dim"):
        scale *= yarn_mscale(params["factor"], params["mscale_all_dim"]) ** 2
    return scale


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...): interleaved rope pairs in rotate-half layout."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


class DeepseekV3Attention(nn.Module):
    def __init__(self, config, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.dims = latent_dims(config)
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        bias = bool(config.attention_bias)
        self.q_lora_rank = config.q_lora_rank
        if config.q_lora_rank is None:
            self.q_proj = Linear(hidden, heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(hidden, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, _LATENT_NORM_EPS)
            self.q_b_proj = Linear(config.q_lora_rank, heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(hidden, config.kv_lora_rank + config.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, _LATENT_NORM_EPS)
        self.kv_b_proj = Linear(config.kv_lora_rank, heads * (config.qk_nope_head_dim + config.v_head_dim),
                                bias=False)
        self.o_proj = Linear(heads * config.v_head_dim, hidden, bias=bias)
        self.rotary_emb = rotary_emb
        self.rope_interleave = bool(getattr(config, "rope_interleave", True))
        self.scale = softmax_scale(config)

    def project(self, positions: torch.Tensor, hidden: torch.Tensor):
        """(q_nope, rotated q_pe, normed latent, rotated k_pe [T, 1, rope dim]) of the step's tokens."""
        dims = self.dims
        if self.q_lora_rank is None:
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q_nope, q_pe = q.unflatten(-1, (dims.num_heads, self.qk_head_dim)).split(
            [dims.qk_nope_head_dim, dims.qk_rope_head_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(hidden).split([dims.kv_lora_rank, dims.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent.contiguous())
        q_pe, k_pe = q_pe.contiguous(), k_pe.unsqueeze(1).contiguous()  # k_pe: one head shared by all
        if self.rope_interleave:
            q_pe, k_pe = deinterleave(q_pe), deinterleave(k_pe)
        q_pe, k_pe = self.rotary_emb(positions, q_pe, k_pe)
        return q_nope, q_pe, latent, k_pe

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        q_nope, q_pe, latent, k_pe = self.project(positions, hidden)
        write_latent(kv_cache, latent, k_pe[:, 0], metadata.slot_mapping)
        out = latent_attention(q_nope, q_pe, kv_cache, metadata, self.kv_b_proj.weight, self.dims, self.scale)
        return self.o_proj(out.flatten(-2))


class DeepseekV3Router(nn.Module):
    """Scores in float32 from a float32 weight, as transformers keeps it; the correction bias is a checkpoint
    tensor (a parameter here so the loader finds it)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size, dtype=torch.float32),
                                   requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.empty(config.n_routed_experts, dtype=torch.float32),
                                                    requires_grad=False)

    def forward(self, hidden: torch.Tensor):
        config = self.config
        logits = F.linear(hidden.float(), self.weight.float())
        return sigmoid_group_top_k(logits, config.num_experts_per_tok, config.n_group, config.topk_group,
                                   self.e_score_correction_bias, bool(config.norm_topk_prob),
                                   float(config.routed_scaling_factor))


class DeepseekV3MoE(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.gate = DeepseekV3Router(config)
        self.experts = FusedMoE(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = GatedMLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts,
                                       config.hidden_act)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden, self.gate(hidden)) + self.shared_experts(hidden)


class DeepseekV3DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DeepseekV3Attention(config, rotary_emb)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = (GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
                    if layer_idx < config.first_k_dense_replace else DeepseekV3MoE(config))

    # The same pre-norm block as Llama's (the same four submodule names): its forward, not a copy.
    forward = LlamaDecoderLayer.forward


class DeepseekV3Model(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config.qk_rope_head_dim, config.max_position_embeddings,
                                          rope_parameters(config))
        self.layers = nn.ModuleList(DeepseekV3DecoderLayer(config, i, self.rotary_emb)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    # Llama's loop over the same submodule names (embed_tokens, layers, norm): its forward, not a copy.
    forward = LlamaModel.forward


class DeepseekV3ForCausalLM(MixtralForCausalLM):
    """The latent cache (kv_cache_shape) replaces full K/V; weights load as Mixtral's do (experts per expert or
    stacked, shared experts' gate/up merged)."""
    supports_cuda_graphs = False  # the latent attention is torch code reading host-side lengths

    def __init__(self, config) -> None:
        nn.Module.__init__(self)
        require_silu(config)
        if config.n_routed_experts % config.n_group:
            raise ValueError(f"n_routed_experts ({config.n_routed_experts}) must be a multiple of n_group "
                             f"({config.n_group})")
        self.config = config
        self.model = DeepseekV3Model(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.num_layers = config.num_hidden_layers
        self.latent_dims = latent_dims(config)
        self.vocab_size = config.vocab_size

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return latent_cache_shape(self.latent_dims, num_blocks, block_size)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((name, tensor) for name, tensor in weights if not self._is_prediction_layer(name))

    def _parts(self, hf_name: str, tensor: torch.Tensor):
        if ".self_attn.q_proj." in hf_name:  # MLA's one query projection (q_lora_rank None), not a q/k/v shard
            return [(hf_name, hf_name, None, tensor)]
        return super()._parts(hf_name, tensor)

    def _is_prediction_layer(self, name: str) -> bool:
        parts = name.split(".")
        return (len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
                and int(parts[2]) >= self.num_layers)
