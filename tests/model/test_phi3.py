"""Phi-3 against transformers on tiny random checkpoints (fused qkv_proj and gate_up_proj, LongRoPE, partial
rotary, pad_token_id inside the vocabulary): logits per step and chunk, the engine's greedy tokens under batching,
chunked prefill, preemption and prefix caching, and prompt logprobs.

original_max_position_embeddings is 96: every prompt (up to 70 tokens) and its 12 new tokens fit it, where
transformers' generate() uses the short factors throughout; past it, generate() recomputes the cache with the long
factors, which the engine does not (serval.layers.rotary), so the long factors are checked position by position
against transformers' rotary embedding."""
from __future__ import annotations

import pytest
import torch
import transformers

from tests.engine.test_engine import NUM_NEW_TOKENS, make_prompts
from tests.model.engine_checks import (check_greedy_matches_transformers, check_logits_match_transformers,
                                       check_prompt_logprobs_match_transformers,
                                       check_two_prompts_greedy_match_transformers)
from tests.model.tiny_models import ORIGINAL_PHI3_CONTEXT, longrope, tiny_config

from serval.layers.rotary import RotaryEmbedding, rope_parameters
from serval.model.loader import load_model
from serval.model.phi3 import Phi3ForCausalLM

VARIANTS = {
    "longrope": {},
    "partial-rotary": dict(partial_rotary_factor=0.5, rope_scaling=longrope(8)),
    "sliding-window": dict(sliding_window=24, rope_scaling=None),
}


@pytest.fixture(scope="module")
def tiny_phi3(tiny_checkpoint):
    return lambda variant: tiny_checkpoint("phi3", **VARIANTS[variant])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_flat_batch_and_chunked_prefill_match_transformers(tiny_phi3, variant):
    check_logits_match_transformers(*tiny_phi3(variant), Phi3ForCausalLM)


def test_longrope_positions_past_the_original_context_use_the_long_factors():
    """transformers' rotary embedding called (as in one decode step) at a single position: below the original
    context it takes the short factors, from it on the long ones, with the attention factor on both."""
    config = tiny_config("phi3", partial_rotary_factor=0.5, rope_scaling=longrope(8))
    hf_rope = transformers.models.phi3.modeling_phi3.Phi3RotaryEmbedding(config)
    ours = RotaryEmbedding(16, config.max_position_embeddings, rope_parameters(config))
    assert ours.rotary_dim == 8
    for position in (0, 5, ORIGINAL_PHI3_CONTEXT - 1, ORIGINAL_PHI3_CONTEXT, 150, 191):
        cos, sin = hf_rope(torch.zeros(1), torch.tensor([[position]]))
        torch.testing.assert_close(ours.cos_cache[position], cos[0, 0, :4], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ours.sin_cache[position], sin[0, 0, :4], atol=1e-6, rtol=1e-6)
    short, long = ours.cos_cache[ORIGINAL_PHI3_CONTEXT - 1], ours.cos_cache[ORIGINAL_PHI3_CONTEXT]
    assert short.abs().max() > 1.0 and long.abs().max() > 1.0  # the attention factor sqrt(1 + ln 2 / ln 96)


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
@pytest.mark.parametrize("variant", ["longrope", "partial-rotary"])
def test_engine_greedy_matches_transformers(tiny_phi3, variant, prefix_caching):
    path, hf_model = tiny_phi3(variant)
    # Within the original context, where per-position LongRoPE equals transformers' generate().
    assert max(len(p) for p in make_prompts(hf_model.config.vocab_size)) + NUM_NEW_TOKENS <= ORIGINAL_PHI3_CONTEXT
    check_greedy_matches_transformers(path, hf_model, prefix_caching)


def test_engine_prompt_logprobs_match_transformers(tiny_phi3):
    check_prompt_logprobs_match_transformers(*tiny_phi3("partial-rotary"))


def test_fused_weight_of_the_wrong_size_is_named(tiny_phi3):
    path, hf_model = tiny_phi3("longrope")
    model, _ = load_model(path, load_format="dummy")
    weights = dict(hf_model.state_dict())
    weights["model.layers.0.self_attn.qkv_proj.weight"] = torch.zeros(100, 64)
    with pytest.raises(ValueError, match=r"qkv_proj.weight.*100 rows.*128 \(64 \+ 32 \+ 32\)"):
        model.load_weights(weights.items())


def test_partial_rotary_on_the_triton_attention_backend(tiny_phi3, monkeypatch):
    """The fused rotate-and-store kernel rotates whole heads; with partial rotary the layer rotates in torch and
    stores, and the Triton attention (the interpreter here) reads it: transformers' greedy tokens."""
    pytest.importorskip("triton")
    monkeypatch.setenv("SERVAL_ATTENTION_BACKEND", "triton")
    check_two_prompts_greedy_match_transformers(*tiny_phi3("partial-rotary"))
