"""Gemma 3 (text) against transformers on tiny random checkpoints: logits per step and chunk, and the engine's
greedy tokens and prompt logprobs under batching, chunked prefill, preemption and prefix caching.

The window (8) is far shorter than most prompts (up to 70 tokens), so the sliding layers drop most of the context
while the global layer between them keeps it all; the norms are randomized (transformers starts them at zero,
which would hide a missing "1 +"), and the logit soft-cap is small enough to change every logprob."""
from __future__ import annotations

import pytest
import torch
import transformers
from tests.engine.test_engine import hf_greedy, make_prompts
from tests.model.engine_checks import check_greedy_matches_transformers, check_prompt_logprobs_match_transformers
from tests.model.test_llama import hf_logits, run_steps, sequences_for

from serval import LLM, SamplingParams
from serval.layers.norm import GemmaRMSNorm
from serval.model.gemma3 import Gemma3ForCausalLM
from serval.model.loader import load_model

TINY_GEMMA3 = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.08,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0, sliding_window=8, query_pre_attn_scalar=24,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                       "rope_theta": 1000000.0}},
                   final_logit_softcapping=3.0, tie_word_embeddings=True)


def build_tiny_gemma3(path, seed: int = 0, **overrides) -> transformers.Gemma3ForCausalLM:
    config = transformers.Gemma3TextConfig(**{**TINY_GEMMA3, **overrides})
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.3)
    model.generation_config.eos_token_id = None  # tests compare fixed lengths
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3")
    return str(path), build_tiny_gemma3(path)


def test_flat_batch_and_chunked_prefill_match_transformers(tiny_gemma3):
    path, hf_model = tiny_gemma3
    model, config = load_model(path, load_format="safetensors")
    assert isinstance(model, Gemma3ForCausalLM)
    windows = [layer.self_attn.attn.sliding_window for layer in model.model.layers]
    assert windows == [8, None, 8, 8]
    sequences = sequences_for(config.vocab_size)
    expected = hf_logits(hf_model, sequences)
    one_batch = run_steps(model, sequences, [[(0, len(s)) for s in sequences]])
    splits = [4, 9, 23]
    chunked = run_steps(model, sequences, [[(0, s) for s in splits], list(zip(splits, map(len, sequences)))])
    for got_batch, got_chunked, want in zip(one_batch, chunked, expected):
        torch.testing.assert_close(got_batch, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got_chunked, want, atol=1e-4, rtol=1e-4)


def test_each_gemma_detail_changes_the_output(tiny_gemma3):
    """Guards the comparison above against passing vacuously: without the window, with one rope base for all
    layers, or without the embedding scale, the logits of the long sequence differ from transformers'."""
    path, hf_model = tiny_gemma3
    sequences = sequences_for(hf_model.config.vocab_size)
    expected = hf_logits(hf_model, sequences)[2]

    def logits_with(change) -> torch.Tensor:
        model, _ = load_model(path, load_format="safetensors")
        change(model)
        return run_steps(model, sequences, [[(0, len(s)) for s in sequences]])[2]

    def no_window(model):
        for layer in model.model.layers:
            layer.self_attn.attn.sliding_window = None

    def one_rope_base(model):
        for layer in model.model.layers:
            layer.self_attn.attn.rotary_emb = model.model.rotary_embs["full_attention"]

    def no_embed_scale(model):
        model.model.embed_scale = 1.0

    for change in (no_window, one_rope_base, no_embed_scale):
        assert not torch.allclose(logits_with(change), expected, atol=1e-3), change.__name__


def test_bfloat16_embedding_scale_is_rounded_like_transformers(tmp_path):
    hf_model = build_tiny_gemma3(tmp_path, seed=2, hidden_size=72, head_dim=18)  # sqrt(72) = 8.485 -> 8.5 in bf16
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
    build_tiny_gemma3(tmp_path, attn_logit_softcapping=50.0)
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
    path, hf_model = tiny_gemma3
    prompts = [make_prompts(hf_model.config.vocab_size)[i] for i in (6, 9)]  # 23 and 47 tokens, a shared prefix
    llm = LLM(model=path, skip_tokenizer_init=True, max_num_seqs=4, max_num_batched_tokens=16, block_size=4,
              max_model_len=128)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, 4), f"prompt of {len(prompt)}"
    assert llm.engine.get_stats().prefix_cache_hits > 0
