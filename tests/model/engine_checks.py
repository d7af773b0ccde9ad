"""The engine-against-transformers checks every model family's tests run: logits of one flat batch and of chunked
prefill, greedy tokens through an engine forced to batch, chunk prefills, preempt and hit the prefix cache (on the
default kernels and on whichever backend the environment picks), prompt logprobs, and the guard that a family's
details matter (without them the logits differ, so the comparisons cannot pass vacuously)."""
from __future__ import annotations

from typing import Callable

import pytest
import torch

from serval import LLM, SamplingParams
from serval.model.loader import load_model
from tests.engine.test_engine import NUM_NEW_TOKENS, hf_greedy_references, make_prompts, pressured_llm
from tests.model.test_llama import hf_logits, run_steps, sequences_for


def check_logits_match_transformers(path: str, hf_model, model_class: type) -> torch.nn.Module:
    """One flat batch, then chunked prefill (a first chunk; then the rest reading it through the cache, beside a
    single-token, decode-shaped row): transformers' logits. Returns the loaded model."""
    model, config = load_model(path, load_format="safetensors")
    assert isinstance(model, model_class)
    sequences = sequences_for(config.vocab_size)
    expected = hf_logits(hf_model, sequences)
    one_batch = run_steps(model, sequences, [[(0, len(s)) for s in sequences]])
    splits = [4, 9, 23]
    chunked = run_steps(model, sequences, [[(0, s) for s in splits], list(zip(splits, map(len, sequences)))])
    for got_batch, got_chunked, want in zip(one_batch, chunked, expected):
        torch.testing.assert_close(got_batch, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got_chunked, want, atol=1e-4, rtol=1e-4)
    return model


def check_each_change_alters_the_logits(path: str, hf_model,
                                        changes: list[Callable[[torch.nn.Module], None]]) -> None:
    """For each change (applied to a freshly loaded model), the long sequence's logits differ from transformers'."""
    sequences = sequences_for(hf_model.config.vocab_size)
    expected = hf_logits(hf_model, sequences)[2]
    for change in changes:
        model, _ = load_model(path, load_format="safetensors")
        change(model)
        changed = run_steps(model, sequences, [[(0, len(s)) for s in sequences]])[2]
        assert not torch.allclose(changed, expected, atol=1e-3), change.__name__


def check_greedy_matches_transformers(path: str, hf_model, prefix_caching: bool) -> None:
    """A dozen prompts through an engine forced to batch, chunk prefills and preempt: transformers' tokens."""
    check_pressured_greedy(pressured_llm(path, prefix_caching), hf_model, prefix_caching)


def check_pressured_greedy(llm, hf_model, prefix_caching: bool, prompts: list[list[int]] | None = None,
                           num_new_tokens: int = NUM_NEW_TOKENS) -> None:
    """check_greedy_matches_transformers on an engine made by the caller (pressured_llm's sizes, maybe hooked);
    prompts: make_prompts' dozen unless given."""
    prompts = make_prompts(hf_model.config.vocab_size) if prompts is None else prompts
    params = SamplingParams(temperature=0.0, max_tokens=num_new_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    references = hf_greedy_references(hf_model, prompts, num_new_tokens)
    for prompt, output, reference in zip(prompts, outputs, references):
        assert output.outputs[0].token_ids == reference, f"prompt of {len(prompt)}"
    stats = llm.engine.get_stats()
    assert stats.num_preemptions > 0, "the block pool was meant to force preemption"
    assert (stats.prefix_cache_hits > 0) == prefix_caching
    assert stats.num_free_blocks == stats.num_blocks
    llm.engine.kv_cache.check_invariants([])


def check_two_prompts_greedy_match_transformers(path: str, hf_model) -> LLM:
    """Two prompts of 23 and 47 tokens sharing a prefix, through 16-token steps and 4-token blocks (chunked
    prefill, decode, a prefix hit) on whichever backend the environment picks: transformers' greedy tokens.
    Returns the engine for the caller's backend checks."""
    prompts = [make_prompts(hf_model.config.vocab_size)[i] for i in (6, 9)]
    llm = LLM(model=path, skip_tokenizer_init=True, max_num_seqs=4, max_num_batched_tokens=16, block_size=4,
              max_model_len=128)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    for prompt, output, reference in zip(prompts, outputs, hf_greedy_references(hf_model, prompts, 4)):
        assert output.outputs[0].token_ids == reference, f"prompt of {len(prompt)}"
    return llm


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
