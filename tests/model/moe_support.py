"""Tiny random-weight mixture-of-experts checkpoints saved by transformers, for the MoE model tests."""
from __future__ import annotations

import torch
import transformers

# Like tests/conftest.py's TINY; initializer_range large enough that routers prefer some experts clearly.
TINY_MOE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.08, bos_token_id=1,
                eos_token_id=2, pad_token_id=0, num_experts_per_tok=2)

MOE_ARCHITECTURES = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(num_local_experts=4, intermediate_size=48, tie_word_embeddings=False)),
    # Layer 1 is dense (mlp_only_layers); the shared expert is wider than the routed ones.
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  dict(num_experts=6, moe_intermediate_size=32, shared_expert_intermediate_size=80,
                       mlp_only_layers=[1], tie_word_embeddings=True)),
    # Layer 0 is dense (decoder_sparse_step 2); q/k norm; renormalized top-k.
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(num_experts=8, moe_intermediate_size=32, head_dim=32, decoder_sparse_step=2,
                       norm_topk_prob=True, tie_word_embeddings=False)),
}


def build_tiny_moe(path, arch: str, seed: int = 0, save_original_format: bool = True, **overrides):
    """Save a tiny random model of the architecture to path; return the HF model (float32, eval).
    save_original_format=False writes the experts stacked, as transformers 5 keeps them in memory."""
    config_cls, model_cls, extra = MOE_ARCHITECTURES[arch]
    config = config_cls(**{**TINY_MOE, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.generation_config.eos_token_id = None  # tests compare fixed lengths
    model.save_pretrained(path, save_original_format=save_original_format)
    return model
