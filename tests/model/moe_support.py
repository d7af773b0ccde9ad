"""Tiny random-weight mixture-of-experts checkpoints saved by transformers, and the engine-vs-transformers checks
the MoE model tests share (the dense models' harness from tests/engine/test_engine.py)."""
from __future__ import annotations

import pytest
import torch
import transformers

from serval import LLM, SamplingParams
from tests.engine.test_engine import NUM_NEW_TOKENS, hf_greedy, make_prompts, pressured_llm

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


def check_greedy_matches_transformers(path: str, hf_model, prefix_caching: bool) -> None:
    """A dozen prompts through an engine forced to batch, chunk prefills and preempt: transformers' tokens."""
    prompts = make_prompts(hf_model.config.vocab_size)
    llm = pressured_llm(path, prefix_caching)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, NUM_NEW_TOKENS), f"prompt of {len(prompt)}"
    stats = llm.engine.get_stats()
    assert stats.num_preemptions > 0, "the block pool was meant to force preemption"
    assert (stats.prefix_cache_hits > 0) == prefix_caching
    assert stats.num_free_blocks == stats.num_blocks


def check_prompt_logprobs_match_transformers(path: str, hf_model) -> None:
    prompts = make_prompts(hf_model.config.vocab_size, count=6, seed=1)
    llm: LLM = pressured_llm(path, prefix_caching=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(max_tokens=1, prompt_logprobs=2, temperature=0.0), use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        with torch.no_grad():
            reference = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0].float(), dim=-1)
        for position in range(1, len(prompt)):
            token = prompt[position]
            got = output.prompt_logprobs[position][token].logprob
            assert got == pytest.approx(reference[position - 1, token].item(), abs=1e-4), f"position {position}"
