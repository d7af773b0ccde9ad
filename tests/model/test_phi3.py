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
from tests.engine.test_engine import NUM_NEW_TOKENS, hf_greedy, make_prompts
from tests.model.engine_checks import check_greedy_matches_transformers, check_prompt_logprobs_match_transformers
from tests.model.test_llama import hf_logits, run_steps, sequences_for

from serval import LLM, SamplingParams
from serval.layers.rotary import RotaryEmbedding, rope_parameters
from serval.model.loader import load_model
from serval.model.phi3 import Phi3ForCausalLM

ORIGINAL_CONTEXT = 96


def longrope(rotary_dim: int) -> dict:
    half = rotary_dim // 2
    return {"rope_type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(half)],
            "long_factor": [1.5 + 0.4 * i for i in range(half)], "rope_theta": 10000.0}


TINY_PHI3 = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=192, original_max_position_embeddings=ORIGINAL_CONTEXT,
                 initializer_range=0.08, bos_token_id=1, eos_token_id=2, pad_token_id=0, rope_scaling=longrope(16))
VARIANTS = {
    "longrope": {},
    "partial-rotary": dict(partial_rotary_factor=0.5, rope_scaling=longrope(8)),
    "sliding-window": dict(sliding_window=24, rope_scaling=None),
}


def build_tiny_phi3(path, seed: int = 0, **overrides) -> transformers.Phi3ForCausalLM:
    config = transformers.Phi3Config(**{**TINY_PHI3, **overrides})
    torch.manual_seed(seed)
    model = transformers.Phi3ForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # tests compare fixed lengths
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def tiny_phi3(tmp_path_factory):
    built = {}

    def get(variant: str):
        if variant not in built:
            path = tmp_path_factory.mktemp(f"phi3-{variant}")
            built[variant] = (str(path), build_tiny_phi3(path, **VARIANTS[variant]))
        return built[variant]

    return get


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_flat_batch_and_chunked_prefill_match_transformers(tiny_phi3, variant):
    path, hf_model = tiny_phi3(variant)
    model, config = load_model(path, load_format="safetensors")
    assert isinstance(model, Phi3ForCausalLM)
    sequences = sequences_for(config.vocab_size)
    expected = hf_logits(hf_model, sequences)
    one_batch = run_steps(model, sequences, [[(0, len(s)) for s in sequences]])
    splits = [4, 9, 23]
    chunked = run_steps(model, sequences, [[(0, s) for s in splits], list(zip(splits, map(len, sequences)))])
    for got_batch, got_chunked, want in zip(one_batch, chunked, expected):
        torch.testing.assert_close(got_batch, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got_chunked, want, atol=1e-4, rtol=1e-4)


def test_longrope_positions_past_the_original_context_use_the_long_factors():
    """transformers' rotary embedding called (as in one decode step) at a single position: below the original
    context it takes the short factors, from it on the long ones, with the attention factor on both."""
    config = transformers.Phi3Config(**{**TINY_PHI3, "partial_rotary_factor": 0.5, "rope_scaling": longrope(8)})
    hf_rope = transformers.models.phi3.modeling_phi3.Phi3RotaryEmbedding(config)
    ours = RotaryEmbedding(16, config.max_position_embeddings, rope_parameters(config))
    assert ours.rotary_dim == 8
    for position in (0, 5, ORIGINAL_CONTEXT - 1, ORIGINAL_CONTEXT, 150, 191):
        cos, sin = hf_rope(torch.zeros(1), torch.tensor([[position]]))
        torch.testing.assert_close(ours.cos_cache[position], cos[0, 0, :4], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ours.sin_cache[position], sin[0, 0, :4], atol=1e-6, rtol=1e-6)
    short, long = ours.cos_cache[ORIGINAL_CONTEXT - 1], ours.cos_cache[ORIGINAL_CONTEXT]
    assert short.abs().max() > 1.0 and long.abs().max() > 1.0  # the attention factor sqrt(1 + ln 2 / ln 96)


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
@pytest.mark.parametrize("variant", ["longrope", "partial-rotary"])
def test_engine_greedy_matches_transformers(tiny_phi3, variant, prefix_caching):
    path, hf_model = tiny_phi3(variant)
    # Within the original context, where per-position LongRoPE equals transformers' generate().
    assert max(len(p) for p in make_prompts(hf_model.config.vocab_size)) + NUM_NEW_TOKENS <= ORIGINAL_CONTEXT
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
    path, hf_model = tiny_phi3("partial-rotary")
    prompts = [make_prompts(hf_model.config.vocab_size)[i] for i in (6, 9)]
    llm = LLM(model=path, skip_tokenizer_init=True, max_num_seqs=4, max_num_batched_tokens=16, block_size=4,
              max_model_len=128)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, 4), f"prompt of {len(prompt)}"
