"""DeepSeek-V3 against transformers on tiny random checkpoints: logits through prefill chunks and decode steps (the
plain and the absorbed latent attention), with and without q_lora_rank; the engine's greedy tokens and prompt
logprobs under batching, chunked prefill, preemption and prefix caching; the router; and the latent cache against
a full-K/V reference.

YaRN with mscale_all_dim is on (it changes the softmax scale), the correction bias and the norms are randomized
(transformers starts them at zero and one), and v_head_dim differs from the q/k head size."""
from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from serval.engine.model_runner import ModelRunner
from serval.kernels import paged_attention
from serval.layers.mla import LatentDims, latent_attention, write_latent
from serval.layers.moe import sigmoid_group_top_k
from serval.model.loader import load_model  # before the family file: loader -> registry -> families
from tests.kernels.test_triton_attention import random_step
from tests.model.engine_checks import (check_each_change_alters_the_logits, check_greedy_matches_transformers,
                                       check_prompt_logprobs_match_transformers,
                                       check_two_prompts_greedy_match_transformers)
from tests.model.test_llama import hf_logits, run_steps, sequences_for
from tests.model.tiny_models import tiny_config


@pytest.fixture(scope="module", params=[48, None], ids=["q-lora", "q-proj"])
def tiny_deepseek_v3(tiny_checkpoint, request):
    return tiny_checkpoint("deepseek_v3", q_lora_rank=request.param)


def test_prefill_chunks_and_decode_steps_match_transformers(tiny_deepseek_v3):
    path, hf_model = tiny_deepseek_v3
    model, config = load_model(path, load_format="safetensors")
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    sequences = sequences_for(config.vocab_size)  # 5, 17 and 30 tokens
    expected = hf_logits(hf_model, sequences)
    whole = run_steps(model, sequences, [[(0, len(s)) for s in sequences]])
    # Chunks, then decode-only steps (the absorbed path), then a step mixing decodes and a prefill chunk.
    steps = [[(0, 3), (0, 9), (0, 20)], [(3, 4), (9, 10), (20, 21)], [(4, 5), (10, 11), (21, 22)],
             [(5, 5), (11, 17), (22, 23)], [(5, 5), (17, 17), (23, 30)]]
    stepped = run_steps(model, sequences, steps)
    for got_whole, got_stepped, want in zip(whole, stepped, expected):
        torch.testing.assert_close(got_whole, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got_stepped, want, atol=1e-4, rtol=1e-4)


def test_each_deepseek_detail_changes_the_output(tiny_deepseek_v3):
    """Guards the comparison above: without the mscale in the softmax scale, without the correction bias, or with
    rope pairs taken as rotate-half, the logits of the long sequence differ from transformers'."""
    def plain_scale(model):
        for layer in model.model.layers:
            layer.self_attn.scale = 24 ** -0.5

    def no_correction_bias(model):
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.zero_()

    def not_interleaved(model):
        for layer in model.model.layers:
            layer.self_attn.rope_interleave = False

    check_each_change_alters_the_logits(*tiny_deepseek_v3, [plain_scale, no_correction_bias, not_interleaved])


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_engine_greedy_matches_transformers(tiny_deepseek_v3, prefix_caching):
    check_greedy_matches_transformers(*tiny_deepseek_v3, prefix_caching)


def test_engine_prompt_logprobs_match_transformers(tiny_deepseek_v3):
    check_prompt_logprobs_match_transformers(*tiny_deepseek_v3)


def test_router_picks_transformers_experts_and_weights():
    config = tiny_config("deepseek_v3", n_routed_experts=32, n_group=8, topk_group=3, num_experts_per_tok=6)
    torch.manual_seed(0)
    router = DeepseekV3TopkRouter(config)
    with torch.no_grad():
        router.weight.normal_(0.0, 0.3)
        router.e_score_correction_bias.normal_(0.0, 0.3)
    hidden = torch.randn(500, config.hidden_size)
    with torch.no_grad():
        logits, want_weights, want_ids = router(hidden)
    routing = sigmoid_group_top_k(logits, 6, 8, 3, router.e_score_correction_bias, True, 2.5)
    # Both take topk unsorted: compare per token in expert order.
    got_ids, got_order = routing.expert_ids.sort(dim=-1)
    want_ids_sorted, want_order = want_ids.sort(dim=-1)
    assert torch.equal(got_ids, want_ids_sorted)
    torch.testing.assert_close(routing.weights.gather(1, got_order), want_weights.gather(1, want_order),
                               atol=0, rtol=0)
    # The bias changed some choices, and the group limit excluded some experts that scored higher.
    plain = sigmoid_group_top_k(logits, 6, 8, 3, torch.zeros(32), True, 2.5)
    assert not torch.equal(plain.expert_ids.sort(dim=-1)[0], got_ids)
    ungrouped = sigmoid_group_top_k(logits, 6, 1, 1, router.e_score_correction_bias, True, 2.5)
    assert not torch.equal(ungrouped.expert_ids.sort(dim=-1)[0], got_ids)


def test_latent_cache_matches_full_kv_reference_under_chunks_and_prefix_hits():
    """latent_attention (plain for chunks, absorbed for decode rows) against paged attention over the full K and V
    the latents expand to, in one mixed step: a chunk after a cached prefix, a request whose prefix blocks are
    another's (a prefix hit), a whole prompt and decodes."""
    dims = LatentDims(num_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)
    qk_dim = dims.qk_nope_head_dim + dims.qk_rope_head_dim
    rng = random.Random(0)
    spans = [(12, 30), (0, 1), (0, 21), (40, 41), (16, 25)]
    _, metadata = random_step(rng, spans, num_kv_heads=1, head_dim=8, block_size=4, dtype=torch.float32)
    shared = metadata.block_tables[0, :4].clone()
    metadata.block_tables[4, :4] = shared  # request 4's first 16 positions are request 0's blocks
    num_blocks = int(metadata.block_tables.max()) + 1
    torch.manual_seed(0)
    kv_b_weight = torch.randn(dims.num_heads * (dims.qk_nope_head_dim + dims.v_head_dim), dims.kv_lora_rank) * 0.2
    latent_cache = torch.zeros(num_blocks, 4, dims.cache_width)
    full_cache = torch.zeros(2, num_blocks, 4, dims.num_heads, qk_dim)
    for i, (_, end) in enumerate(spans):  # every position up to each request's end, written through its table
        slots = torch.tensor([int(metadata.block_tables[i, p // 4]) * 4 + p % 4 for p in range(end)])
        latent, k_pe = torch.randn(end, dims.kv_lora_rank), torch.randn(end, dims.qk_rope_head_dim)
        if i == 4:  # the shared prefix holds what request 0 wrote
            known = latent_cache.view(-1, dims.cache_width)[slots[:16]]
            latent[:16], k_pe[:16] = known[:, :dims.kv_lora_rank], known[:, dims.kv_lora_rank:]
        write_latent(latent_cache, latent, k_pe, slots)
        kv = (latent @ kv_b_weight.T).view(end, dims.num_heads, -1)
        key = torch.cat((kv[..., :dims.qk_nope_head_dim], k_pe[:, None].expand(-1, dims.num_heads, -1)), dim=-1)
        value = torch.nn.functional.pad(kv[..., dims.qk_nope_head_dim:], (0, qk_dim - dims.v_head_dim))
        paged_attention.write_kv(full_cache, key, value, slots)
    num_tokens = metadata.query_start_loc[-1]
    q_nope, q_pe = torch.randn(num_tokens, 4, dims.qk_nope_head_dim), torch.randn(num_tokens, 4, dims.qk_rope_head_dim)
    got = latent_attention(q_nope, q_pe, latent_cache, metadata, kv_b_weight, dims, 0.3)
    want = paged_attention.paged_attention(torch.cat((q_nope, q_pe), dim=-1), full_cache, metadata, 0.3)
    torch.testing.assert_close(got, want[..., :dims.v_head_dim], atol=1e-4, rtol=1e-4)


def test_latent_cache_bytes_per_token(tiny_deepseek_v3):
    path, _ = tiny_deepseek_v3
    model, config = load_model(path, load_format="dummy")
    per_block = ModelRunner.kv_cache_bytes_per_block(model, 16, torch.bfloat16)
    latent_values = config.kv_lora_rank + config.qk_rope_head_dim
    assert per_block == 16 * config.num_hidden_layers * latent_values * 2
    full_values = model.latent_dims.full_kv_values_per_token()
    assert full_values == 4 * (16 + 8 + 12)
    assert full_values / latent_values == pytest.approx(3.6)


def test_triton_absorbed_decode_matches_reference(monkeypatch):
    """The Triton kernel (the interpreter here) against the torch absorbed decode: heads past one head block,
    contexts from one key to several tiles, non-contiguous block tables, in a batch mixed with a prefill chunk."""
    pytest.importorskip("triton")
    dims = LatentDims(num_heads=20, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)
    rng = random.Random(1)
    spans = [(0, 1), (36, 37), (6, 19), (70, 71), (9, 10)]
    _, metadata = random_step(rng, spans, num_kv_heads=1, head_dim=8, block_size=4, dtype=torch.float32)
    num_blocks = int(metadata.block_tables.max()) + 1
    torch.manual_seed(1)
    cache = torch.randn(num_blocks, 4, dims.cache_width)
    kv_b_weight = torch.randn(dims.num_heads * (dims.qk_nope_head_dim + dims.v_head_dim), dims.kv_lora_rank) * 0.2
    num_tokens = metadata.query_start_loc[-1]
    q_nope, q_pe = torch.randn(num_tokens, 20, dims.qk_nope_head_dim), torch.randn(num_tokens, 20, 8)
    monkeypatch.setenv("SERVAL_ATTENTION_BACKEND", "torch")
    want = latent_attention(q_nope, q_pe, cache, metadata, kv_b_weight, dims, 0.3)
    monkeypatch.setenv("SERVAL_ATTENTION_BACKEND", "triton")
    got = latent_attention(q_nope, q_pe, cache, metadata, kv_b_weight, dims, 0.3)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_triton_backend_in_the_engine_matches_transformers(tiny_deepseek_v3, monkeypatch):
    """Decode steps through the Triton absorbed-decode kernel (the interpreter here) give transformers' greedy
    tokens, with chunked prefill and a prefix hit."""
    pytest.importorskip("triton")
    monkeypatch.setenv("SERVAL_ATTENTION_BACKEND", "triton")
    llm = check_two_prompts_greedy_match_transformers(*tiny_deepseek_v3)
    assert llm.engine.get_stats().prefix_cache_hits > 0


def test_bfloat16_is_close_to_transformers_in_bfloat16(tiny_deepseek_v3):
    path, hf_model = tiny_deepseek_v3
    model, config = load_model(path, load_format="safetensors", dtype=torch.bfloat16)
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32  # the router stays float32, as in transformers
    sequences = sequences_for(config.vocab_size)
    steps = [[(0, 3), (0, 9), (0, 20)], [(3, 4), (9, 10), (20, 21)], [(4, 5), (10, 17), (21, 30)]]
    expected = hf_logits(copy.deepcopy(hf_model).to(torch.bfloat16), sequences)
    for got, want in zip(run_steps(model, sequences, steps), expected):
        # Against transformers in bf16 too: a router's choice can flip under bf16 rounding (it does here).
        assert torch.isfinite(got).all()
        assert (got - want).abs().max() < 0.1 * want.abs().max()
