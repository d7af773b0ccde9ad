"""tensor_parallel_size=2 on CPU (gloo, one spawned worker), dense and mixture-of-experts families: greedy tokens
equal transformers' and tensor_parallel_size=1's through an engine forced to batch, chunk prefills, preempt and hit
the prefix cache; prompt logprobs too (the gathered logits are the whole vocabulary's); clear errors at start."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from serval import LLM, SamplingParams
from serval.openai.errors import InvalidArgument
from tests.conftest import build_tiny_model
from tests.engine.test_engine import NUM_NEW_TOKENS, hf_greedy, make_prompts, pressured_llm
from tests.model.tiny_models import FAMILIES, build_tiny, longrope

# Each case starts a worker process (seconds on a small machine): few cases, each covering several switches.
CASES = {
    "llama": ("llama", {}),  # 2 K/V heads split
    "qwen2": ("qwen2", {}),  # q/k/v biases, tied embeddings
    # per-head q/k norms, explicit head_dim; one K/V head replicated on both ranks; 321 = 161 + 160 (+1 padding)
    "qwen3-replicated-kv-odd-vocab": ("qwen3", dict(num_key_value_heads=1, vocab_size=321)),
    # tests/model/tiny_models.py's families: Gemma 3's sliding and global layers, per-head q/k norms, GeGLU,
    # scaled and tied embedding, final logit soft-cap; Phi-3's fused qkv_proj and gate_up_proj, LongRoPE.
    "gemma3": ("gemma3", {}),
    "phi3-partial-rotary": ("phi3", dict(partial_rotary_factor=0.5, rope_scaling=longrope(8))),
    # Mixture-of-experts, every rank half of every expert: Mixtral's per-expert w1/w2/w3; Qwen3-MoE's stacked
    # gate_up_proj/down_proj (two slices of each gate_up), q/k norm, a dense layer among sparse ones; Qwen2-MoE's
    # shared expert, whose partial sum joins the experts' before the all-reduce, q/k/v bias, tied embeddings.
    "mixtral-per-expert": ("mixtral", dict(save_original_format=True)),
    "qwen3_moe-stacked": ("qwen3_moe", dict(save_original_format=False)),
    "qwen2_moe-per-expert": ("qwen2_moe", dict(save_original_format=True)),
}
# Cases whose prompt logprobs are checked too: the gathered vocabulary, and the soft-cap applied after the gather.
LOGPROB_CASES = ("qwen3-replicated-kv-odd-vocab", "gemma3")
# hf_overrides given to both engines (every rank builds from the overridden config), against transformers loading
# the checkpoint with the same fields.
HF_OVERRIDES = {"llama": {"rms_norm_eps": 0.25}}


def build_case(path, arch: str, **overrides):
    """tests/conftest.py's architectures, or tests/model/tiny_models.py's families."""
    if arch in FAMILIES:
        return build_tiny(path, arch, **overrides)
    return build_tiny_model(path, arch, **overrides)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers_and_tp1(tmp_path, case):
    arch, overrides = CASES[case]
    hf_model = build_case(tmp_path, arch, **overrides)
    hf_overrides = HF_OVERRIDES.get(case)
    if hf_overrides is not None:
        import transformers
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                                     **hf_overrides).eval()
    with greedy_checked_tp_llm(str(tmp_path), hf_model, model_args=dict(hf_overrides=hf_overrides)) as llm:
        stats = llm.engine.get_stats()
        assert stats.num_free_blocks == stats.num_blocks
        if case in LOGPROB_CASES:
            check_prompt_logprobs(llm, hf_model)


@contextmanager
def greedy_checked_tp_llm(path: str, hf_model, model_args: dict | None = None, **engine_args) -> Iterator[LLM]:
    """A tensor_parallel_size=2 engine on the checkpoint at `path` whose greedy tokens, for a dozen prompts under
    preemption and prefix hits, equal tensor_parallel_size=1's and transformers'; yielded for the caller's own
    checks, then shut down, leaving no worker process. model_args go to both engines, engine_args to the
    tensor-parallel one."""
    prompts = make_prompts(hf_model.config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    single = pressured_llm(path, prefix_caching=True, **(model_args or {}))
    expected = [o.outputs[0].token_ids for o in single.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                                use_tqdm=False)]
    llm = pressured_llm(path, prefix_caching=True, tensor_parallel_size=2, **(model_args or {}), **engine_args)
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == expected
        for prompt, output in zip(prompts, outputs):
            assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, NUM_NEW_TOKENS), f"{len(prompt)}"
        stats = llm.engine.get_stats()
        assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
        yield llm
    finally:
        llm.shutdown()
    assert not [p for p in llm.engine.executor.processes if p.is_alive()]


def check_prompt_logprobs(llm: LLM, hf_model) -> None:
    prompt = make_prompts(hf_model.config.vocab_size, count=8, seed=1)[-1]
    output = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1, prompt_logprobs=2),
                          use_tqdm=False)[0]
    with torch.no_grad():
        reference = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    for position in range(1, len(prompt)):
        token = prompt[position]
        assert output.prompt_logprobs[position][token].logprob == pytest.approx(
            reference[position - 1, token].item(), abs=1e-4), f"position {position}"


def test_heads_not_divisible_is_refused_before_any_worker_starts(tmp_path):
    build_tiny_model(tmp_path, "llama", hidden_size=48, num_attention_heads=3, num_key_value_heads=1)
    with pytest.raises(InvalidArgument, match=r"tensor_parallel_size=2 must divide .*num_attention_heads=3") as info:
        LLM(model=str(tmp_path), skip_tokenizer_init=True, tensor_parallel_size=2)
    assert info.value.param == "tensor_parallel_size"


def test_more_ranks_than_devices_is_refused(tmp_path):
    build_tiny_model(tmp_path, "llama")
    with pytest.raises(InvalidArgument, match=r"tensor_parallel_size=4096: this host has \d+ CPU cores"):
        LLM(model=str(tmp_path), skip_tokenizer_init=True, tensor_parallel_size=4096)


def test_the_multiprocess_executor_at_size_one_gives_the_engines_tokens(tmp_path):
    """distributed_executor_backend="mp" at size 1 (what benchmarks/tp_bench.py times against today's path): no
    worker to start, and the same tokens (test_size_one.py: the same layers and ops, step for step)."""
    hf_model = build_tiny_model(tmp_path, "llama")
    prompts = make_prompts(hf_model.config.vocab_size, count=6)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    single = pressured_llm(str(tmp_path), prefix_caching=True)
    executor = pressured_llm(str(tmp_path), prefix_caching=True, distributed_executor_backend="mp")
    try:
        assert executor.engine.executor is not None and executor.engine.executor.processes == []
        through_executor, in_process = (
            [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                          use_tqdm=False)] for llm in (executor, single))
        assert through_executor == in_process
    finally:
        executor.engine.shutdown()


def test_engine_arguments_are_checked():
    from serval.config import EngineConfig
    with pytest.raises(InvalidArgument, match="tensor_parallel_size=0"):
        EngineConfig(tensor_parallel_size=0)
    with pytest.raises(InvalidArgument, match="distributed_executor_backend='ray'"):
        EngineConfig(distributed_executor_backend="ray")
