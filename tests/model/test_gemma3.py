"""Gemma 3 (text) against transformers on tiny random checkpoints: logits per step and chunk, and the engine's
greedy tokens and prompt logprobs under batching, chunked prefill, preemption and prefix caching.

The window (8) is far shorter than most prompts (up to 70 tokens), so the sliding layers drop most of the context
while the global layer between them keeps it all; the norms are randomized (transformers starts them at zero,
which would hide a missing "1 +"), and the logit soft-cap is small enough to change every logprob."""
from __future__ import annotations

import pytest
import torch

from tests.model.engine_checks import (check_each_change_alters_the_logits, check_greedy_matches_transformers,
                                       check_logits_match_transformers, check_prompt_logprobs_match_transformers,
                                       check_two_prompts_greedy_match_transformers)
from tests.model.test_llama import hf_logits, run_steps, sequences_for
from tests.model.tiny_models import build_tiny

from serval import LLM
from serval.layers.norm import GemmaRMSNorm
from serval.model.gemma3 import Gemma3ForCausalLM
from serval.model.loader import load_model


@pytest.fixture(scope="module")
def tiny_gemma3(tiny_checkpoint):
    return tiny_checkpoint("gemma3")


def test_flat_batch_and_chunked_prefill_match_transformers(tiny_gemma3):
    model = check_logits_match_transformers(*tiny_gemma3, Gemma3ForCausalLM)
    assert [layer.self_attn.attn.sliding_window for layer in model.model.layers] == [8, None, 8, 8]


def test_each_gemma_detail_changes_the_output(tiny_gemma3):
    """Guards the comparison above against passing vacuously: without the window, with one rope base for all
    layers, or without the embedding scale, the logits of the long sequence differ from transformers'."""
    def no_window(model):
        for layer in model.model.layers:
            layer.self_attn.attn.sliding_window = None

    def one_rope_base(model):
        for layer in model.model.layers:
            layer.self_attn.attn.rotary_emb = model.model.rotary_embs["full_attention"]

    def no_embed_scale(model):
        model.model.embed_scale = 1.0

    check_each_change_alters_the_logits(*tiny_gemma3, [no_window, one_rope_base, no_embed_scale])


def test_bfloat16_embedding_scale_is_rounded_like_transformers(tmp_path):
    hf_model = build_tiny(tmp_path, "gemma3", seed=2, hidden_size=72, head_dim=18)  # sqrt(72) = 8.485 -> 8.5 in bf16
    hf_model = hf_model.to(torch.bfloat16)
    model, config = load_model(str(tmp_path), load_format="safetensors", dtype=torch.bfloat16)
    tokens = torch.tensor([5, 17, 99])
    torch.testing.assert_close(model.model.embed_tokens(tokens) * torch.tensor(8.5, dtype=torch.bfloat16),
                               hf_model.model.embed_tokens(tokens[None])[0], atol=0, rtol=0)
    sequences = sequences_for(config.vocab_size)
    got = run_steps(model, sequences, [[(0, len(s)) for s in sequences]])
    for g, want in zip(got, hf_logits(hf_model, sequences)):
        assert (g - want).abs().max() < 0.05 * want.abs().max() + 0.05


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_engine_greedy_matches_transformers(tiny_gemma3, prefix_caching):
    check_greedy_matches_transformers(*tiny_gemma3, prefix_caching)


def test_engine_prompt_logprobs_match_transformers(tiny_gemma3):
    check_prompt_logprobs_match_transformers(*tiny_gemma3)


def test_unsupported_options_are_named(tmp_path):
    build_tiny(tmp_path, "gemma3", attn_logit_softcapping=50.0)
    with pytest.raises(ValueError, match="attn_logit_softcapping=50.0"):
        LLM(model=str(tmp_path), skip_tokenizer_init=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_rms_norm_equals_transformers_bit_for_bit(dtype):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    torch.manual_seed(0)
    hf = Gemma3RMSNorm(64, eps=1e-6).to(dtype)
    ours = GemmaRMSNorm(64, eps=1e-6).to(dtype)
    assert not ours.weight.any()  # (1 + 0): a checkpoint's zero weight is the identity scale
    with torch.no_grad():
        hf.weight.normal_()
        ours.weight.copy_(hf.weight)
    x, residual = torch.randn(7, 64, dtype=dtype), torch.randn(7, 64, dtype=dtype)
    torch.testing.assert_close(ours(x), hf(x), atol=0, rtol=0)
    normed, new_residual = ours(x, residual)
    torch.testing.assert_close(new_residual, residual + x, atol=0, rtol=0)
    torch.testing.assert_close(normed, hf(residual + x), atol=0, rtol=0)


def test_triton_attention_backend_matches_transformers(tiny_gemma3, monkeypatch):
    """The Triton kernels (the interpreter here, compiled on a GPU): windowed and global layers, chunked prefill and
    a prefix hit give transformers' greedy tokens."""
    pytest.importorskip("triton")
    monkeypatch.setenv("SERVAL_ATTENTION_BACKEND", "triton")
    llm = check_two_prompts_greedy_match_transformers(*tiny_gemma3)
    assert llm.engine.get_stats().prefix_cache_hits > 0
