"""Tiny random-weight checkpoints of the model families, saved by transformers: the reference every family's tests
compare against. One builder for all of them, so that a family's test file says only what it checks.

Each family's config exercises what makes it different (windows far shorter than the prompts, YaRN, LongRoPE, a
group-limited router, a dense layer among sparse ones), and where transformers starts a parameter at a value that
would hide a missing term (norms at 0 or 1, biases at 0), `randomize` moves it away.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import transformers

ORIGINAL_PHI3_CONTEXT = 96


def longrope(rotary_dim: int) -> dict:
    """Phi-3's LongRoPE scaling for a rotary dimension: distinct short and long factors per frequency."""
    half = rotary_dim // 2
    return {"rope_type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(half)],
            "long_factor": [1.5 + 0.4 * i for i in range(half)], "rope_theta": 10000.0}


def _norms_around(mean: float) -> Callable[[torch.nn.Module], None]:
    def randomize(model: torch.nn.Module) -> None:
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(mean, 0.3)
    return randomize


def _randomize_gpt_oss(model: torch.nn.Module) -> None:
    for name, param in model.named_parameters():
        if "norm" in name:
            param.normal_(1.0, 0.3)
        elif name.endswith(("_bias", "sinks")):
            param.normal_(0.0, 0.5)


def _randomize_deepseek_v3(model: torch.nn.Module) -> None:
    _norms_around(1.0)(model)
    for layer in model.model.layers[model.config.first_k_dense_replace:]:
        layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.2)


@dataclass(frozen=True)
class TinyFamily:
    config_class: type
    model_class: type
    config: dict
    randomize: Callable[[torch.nn.Module], None] | None = None


_SPECIAL_TOKENS = dict(vocab_size=320, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.08)
# Like tests/conftest.py's TINY; initializer_range large enough that routers prefer some experts clearly.
_TINY_MOE = dict(_SPECIAL_TOKENS, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, num_experts_per_tok=2)

FAMILIES = {
    # The window (8) is far shorter than most prompts; YaRN is active (factor 4 over an original context of 64);
    # swiglu_limit is low enough that the clamp changes outputs.
    "gpt_oss": TinyFamily(transformers.GptOssConfig, transformers.GptOssForCausalLM, dict(
        _SPECIAL_TOKENS, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
        sliding_window=8, swiglu_limit=0.5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 64, "rope_theta": 150000.0}), _randomize_gpt_oss),
    # YaRN with mscale_all_dim (it changes the softmax scale); v_head_dim differs from the q/k head size.
    "deepseek_v3": TinyFamily(transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, dict(
        _SPECIAL_TOKENS, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_group=4, topk_group=2,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
        kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
        max_position_embeddings=256, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 1.0,
                         "mscale_all_dim": 0.7, "beta_fast": 32, "beta_slow": 1, "rope_theta": 10000.0}),
        _randomize_deepseek_v3),
    # One global layer among windowed ones, each kind with its own rope; Gemma's norms scale by (1 + w), so they
    # are randomized around 0; the logit soft-cap is small enough to change every logprob.
    "gemma3": TinyFamily(transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, dict(
        _SPECIAL_TOKENS, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=8, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}},
        final_logit_softcapping=3.0, tie_word_embeddings=True), _norms_around(0.0)),
    "phi3": TinyFamily(transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(
        _SPECIAL_TOKENS, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=192, original_max_position_embeddings=ORIGINAL_PHI3_CONTEXT,
        rope_scaling=longrope(16))),
    "mixtral": TinyFamily(transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(
        _TINY_MOE, num_local_experts=4, intermediate_size=48, tie_word_embeddings=False)),
    # Layer 1 is dense (mlp_only_layers); the shared expert is wider than the routed ones.
    "qwen2_moe": TinyFamily(transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, dict(
        _TINY_MOE, num_experts=6, moe_intermediate_size=32, shared_expert_intermediate_size=80, mlp_only_layers=[1],
        tie_word_embeddings=True)),
    # Layer 0 is dense (decoder_sparse_step 2); q/k norm; renormalized top-k.
    "qwen3_moe": TinyFamily(transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, dict(
        _TINY_MOE, num_experts=8, moe_intermediate_size=32, head_dim=32, decoder_sparse_step=2, norm_topk_prob=True,
        tie_word_embeddings=False)),
}


def tiny_config(family: str, **overrides) -> transformers.PretrainedConfig:
    spec = FAMILIES[family]
    return spec.config_class(**{**spec.config, **overrides})


def build_tiny(path, family: str, seed: int = 0, save_original_format: bool = True,
               **overrides) -> transformers.PreTrainedModel:
    """Save a tiny random model of the family to path; return the transformers model (float32, eval).
    save_original_format=False writes MoE experts stacked, as transformers 5 keeps them in memory."""
    spec = FAMILIES[family]
    torch.manual_seed(seed)
    model = spec.model_class(tiny_config(family, **overrides)).eval()
    if spec.randomize is not None:
        with torch.no_grad():
            spec.randomize(model)
    model.generation_config.eos_token_id = None  # tests compare fixed lengths
    model.save_pretrained(path, save_original_format=save_original_format)
    return model
