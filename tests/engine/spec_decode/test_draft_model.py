"""Speculative decoding with a draft model: greedy outputs equal transformers' generate(assistant_model=...) (which
equals plain greedy) under batching pressure; a draft equal to the target is always accepted (its paged cache on the
target's block ids holds the right K/V through prefix hits and preemption)."""
import pytest
import torch

from serval import SamplingParams
from serval.openai.errors import InvalidArgument
from tests.conftest import build_tiny_model
from tests.engine.test_engine import hf_greedy, make_prompts, pressured_llm

NUM_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    """A one-layer draft sharing the tiny llama's vocabulary, different weights."""
    path = tmp_path_factory.mktemp("draft")
    return str(path), build_tiny_model(path, "llama", seed=1, num_hidden_layers=1, hidden_size=32,
                                       intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)


def run(path: str, prompts, speculative_config) -> tuple[list[list[int]], object]:
    llm = pressured_llm(path, True, speculative_config=speculative_config)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    stats = llm.engine.get_stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert stats.num_free_blocks == stats.num_blocks
    llm.engine.kv_cache.check_invariants([])
    return [output.outputs[0].token_ids for output in outputs], stats.spec_decode


def test_greedy_equals_transformers_assisted_generation(tiny_models, draft):
    path, hf_model = tiny_models("llama")
    draft_path, hf_draft = draft
    prompts = make_prompts(hf_model.config.vocab_size)
    got, spec = run(path, prompts, {"method": "draft_model", "model": draft_path, "num_speculative_tokens": 3})
    for prompt, tokens in zip(prompts, got):
        with torch.no_grad():
            assisted = hf_model.generate(torch.tensor([prompt]), assistant_model=hf_draft, do_sample=False,
                                         max_new_tokens=NUM_NEW_TOKENS, min_new_tokens=NUM_NEW_TOKENS,
                                         pad_token_id=0)[0, len(prompt):].tolist()
        assert assisted == hf_greedy(hf_model, prompt, NUM_NEW_TOKENS)
        assert tokens == assisted, f"prompt of {len(prompt)}"
    assert spec.num_draft_tokens > 0


def test_the_target_as_its_own_draft_is_always_accepted(tiny_models):
    path, hf_model = tiny_models("qwen3")
    prompts = make_prompts(hf_model.config.vocab_size)
    got, spec = run(path, prompts, {"method": "draft_model", "model": path, "num_speculative_tokens": 3})
    for prompt, tokens in zip(prompts, got):
        assert tokens == hf_greedy(hf_model, prompt, NUM_NEW_TOKENS)
    assert spec.num_draft_tokens > 30
    assert spec.num_accepted_tokens == spec.num_draft_tokens


def test_a_draft_with_another_vocabulary_is_refused(tiny_models, tmp_path):
    path, _ = tiny_models("llama")
    build_tiny_model(tmp_path, "llama", vocab_size=100)
    with pytest.raises(InvalidArgument, match="vocabulary"):
        pressured_llm(path, True, speculative_config={"method": "draft_model", "model": str(tmp_path),
                                                      "num_speculative_tokens": 2})
