"""Gemma 3 (text): a pre- and post-norm decoder whose layers alternate local sliding-window and global attention.

    h   = x + PostAttnNorm(Attn(InputNorm(x)))
    out = h + PostFFNorm(MLP(PreFFNorm(h)))                         (Gemma Team, 2025)
    Attn: merged qkv projection, per-head RMSNorm of q and k, RoPE, paged causal GQA scaled by
          query_pre_attn_scalar^-1/2, o_proj
    MLP:  merged gate/up projection, GELU-tanh(gate) * up, down_proj  (GeGLU)

Five layers of every six attend to the last `sliding_window` positions and rotate with the local base
(rope_local_base_freq, 10k); the sixth attends to everything and rotates with rope_theta (1M) and its scaling.
`config.layer_types` says which layer is which (transformers builds it from sliding_window_pattern). Every norm is
Gemma's (1 + w) RMSNorm; the embedding is scaled by sqrt(hidden_size), rounded to the embedding's dtype as
transformers does; the LM head shares the embedding and its logits may be soft-capped (final_logit_softcapping).
The weights loader is the Llama family's: the same Hugging Face names, the same merged projections.
"""
from __future__ import annotations

import torch
from torch import nn

from serval.layers.attention import Attention, AttentionMetadata
from serval.layers.embedding import Embedding
from serval.layers.linear import Linear, qkv_linear
from serval.layers.mlp import GatedMLP
from serval.layers.norm import GemmaRMSNorm
from serval.layers.rotary import RotaryEmbedding, rope_parameters
from serval.model.llama import LlamaForCausalLM, head_dim_of

SLIDING, FULL = "sliding_attention", "full_attention"


def layer_types_of(config) -> list[str]:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:  # configs written before transformers spelled it out per layer
        pattern = getattr(config, "sliding_window_pattern", 6)
        layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(config.num_hidden_layers)]
    return list(layer_types)


class Gemma3Attention(nn.Module):
    def __init__(self, config, layer_type: str, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = qkv_linear(config.hidden_size, num_heads, num_kv_heads, self.head_dim, bias)
        self.o_proj = Linear(num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.attn = Attention(num_heads, num_kv_heads, self.head_dim, scale=config.query_pre_attn_scalar ** -0.5,
                              rotary_emb=rotary_emb,
                              sliding_window=config.sliding_window if layer_type == SLIDING else None)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        q, k, v = (x.unflatten(-1, (-1, self.head_dim)) for x in (q, k, v))  # [T, heads, head_dim]
        out = self.attn(positions, self.q_norm(q), self.k_norm(k), v, kv_cache, metadata)
        return self.o_proj(out.flatten(-2))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config, layer_type: str, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        hidden_size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(hidden_size, eps)
        self.self_attn = Gemma3Attention(config, layer_type, rotary_emb)
        self.post_attention_layernorm = GemmaRMSNorm(hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden_size, eps)
        hidden_act = getattr(config, "hidden_activation", None) or config.hidden_act
        self.mlp = GatedMLP(hidden_size, config.intermediate_size, hidden_act)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden_size, eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                kv_cache: torch.Tensor, metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        # As in Llama, the residual stream travels beside the block output and the next pre-norm adds it.
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden, kv_cache, metadata))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma3Model(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.embed_scale = config.hidden_size ** 0.5
        layer_types = layer_types_of(config)
        # One cos/sin table per layer type: local layers and global ones rotate with different bases.
        self.rotary_embs = nn.ModuleDict({
            layer_type: RotaryEmbedding(head_dim_of(config), config.max_position_embeddings,
                                        rope_parameters(config, layer_type))
            for layer_type in sorted(set(layer_types))})
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, layer_type, self.rotary_embs[layer_type])
                                    for layer_type in layer_types)
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                metadata: AttentionMetadata) -> torch.Tensor:
        embeddings = self.embed_tokens(input_ids)
        # transformers rounds sqrt(hidden) to the embedding's dtype before scaling (33.94 is 34.0 in bf16).
        hidden = embeddings * torch.tensor(self.embed_scale, dtype=torch.float32).to(embeddings.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Gemma 3's text model; load_weights and the names it maps are the Llama family's."""

    def __init__(self, config) -> None:
        nn.Module.__init__(self)
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise ValueError(f"attn_logit_softcapping={config.attn_logit_softcapping} is not supported (Gemma 3 "
                             "checkpoints leave it unset; Gemma 2's attention soft-capping is not implemented)")
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("use_bidirectional_attention=True (EmbeddingGemma) is not supported: Serval's "
                             "attention is causal")
        self.config = config
        self.model = Gemma3Model(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None)
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        self.vocab_size = config.vocab_size

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.final_logit_softcapping is not None:  # cap * tanh(logits / cap), in the model dtype as transformers
            logits = torch.tanh(logits / self.final_logit_softcapping) * self.final_logit_softcapping
        return logits.float()
