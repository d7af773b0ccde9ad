"""tensor_parallel_size=2 for mixture-of-experts models on CPU (gloo, one spawned worker): every rank holds half
of every expert, and greedy tokens equal transformers' and tensor_parallel_size=1's through an engine forced to
batch, chunk prefills, preempt and hit the prefix cache."""
from __future__ import annotations

import pytest

from serval import SamplingParams
from tests.engine.test_engine import NUM_NEW_TOKENS, hf_greedy, make_prompts, pressured_llm
from tests.model.tiny_models import build_tiny

# Each case starts a worker process: few cases, each covering several switches.
CASES = {
    "mixtral-per-expert": ("mixtral", True),  # block_sparse_moe.experts.N.w1/w2/w3; Llama attention
    # stacked gate_up_proj/down_proj (two slices of each gate_up); q/k norm; a dense layer among sparse ones
    "qwen3_moe-stacked": ("qwen3_moe", False),
    # a shared expert whose partial sum joins the experts' before the all-reduce; q/k/v bias; tied embeddings
    "qwen2_moe-per-expert": ("qwen2_moe", True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers_and_tp1(tmp_path, case):
    family, save_original_format = CASES[case]
    hf_model = build_tiny(tmp_path, family, save_original_format=save_original_format)
    prompts = make_prompts(hf_model.config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    single = pressured_llm(str(tmp_path), prefix_caching=True)
    expected = [o.outputs[0].token_ids for o in single.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                                use_tqdm=False)]
    llm = pressured_llm(str(tmp_path), prefix_caching=True, tensor_parallel_size=2)
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == expected
        for prompt, output in zip(prompts, outputs):
            assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, NUM_NEW_TOKENS), f"{len(prompt)}"
        stats = llm.engine.get_stats()
        assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    finally:
        llm.shutdown()
    assert not [p for p in llm.engine.executor.processes if p.is_alive()]
