"""LLM.generate with LoRA adapters against PEFT on the same tiny random weights: each request's greedy tokens equal
the PEFT model's with its adapter, alone and in mixed batches (base + three adapters interleaved), under chunked
prefill, preemption, few resident slots and a small host cache, and with the prefix cache never shared between
adapters."""
from __future__ import annotations

import pytest

from serval import LLM, LoRARequest, SamplingParams
from tests.conftest import build_tiny_model
from tests.lora.peft_adapters import build_adapter, greedy

# Four tokens: a prefill and three decode steps per request, each decode in the graph tests an interpreted
# Triton step of every row; every adapter still changes every prompt's tokens (the family fixture asserts it).
MAX_TOKENS = 4
PROMPTS = [[1, 17, 42, 99, 7, 23, 5, 61], [1, 300, 2, 18], [1] + list(range(40, 75)), [1, 8, 9, 10, 11, 12]]
# (rank, alpha, rsLoRA, targets): several ranks, rsLoRA, and an adapter of the attention alone.
ADAPTERS = {"a8": (8, 16, False, None), "b16": (16, 8, True, None), "c4": (4, 32, False, ["q_proj", "v_proj"])}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny Llama, its three adapters (name -> (LoRARequest, PEFT model)) and the references."""
    root = tmp_path_factory.mktemp("lora_family")
    hf = build_tiny_model(root / "base", "llama")
    adapters = {}
    for adapter_id, (name, (rank, alpha, rslora, targets)) in enumerate(ADAPTERS.items(), start=1):
        kwargs = dict(targets=targets) if targets else {}
        model = build_adapter(hf, root / name, rank=rank, alpha=alpha, use_rslora=rslora, seed=adapter_id, **kwargs)
        adapters[name] = (LoRARequest(name, adapter_id, str(root / name)), model)
    expected = {(None, i): greedy(hf, prompt, MAX_TOKENS) for i, prompt in enumerate(PROMPTS)}
    for name, (_, model) in adapters.items():
        for i, prompt in enumerate(PROMPTS):
            expected[(name, i)] = greedy(model, prompt, MAX_TOKENS)
            assert expected[(name, i)] != expected[(None, i)], "the adapter must change the output to be tested"
    return str(root / "base"), adapters, expected


def params() -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


def run(llm: LLM, adapters, jobs: list[tuple[str | None, int]]) -> list[list[int]]:
    """jobs: (adapter name or None, prompt index), all in one generate call."""
    outputs = llm.generate([{"prompt_token_ids": PROMPTS[i]} for _, i in jobs], params(), use_tqdm=False,
                           lora_request=[adapters[name][0] if name else None for name, _ in jobs])
    return [output.outputs[0].token_ids for output in outputs]


def mixed_jobs() -> list[tuple[str | None, int]]:
    names = [None, *ADAPTERS]
    return [(names[k % 4], k % len(PROMPTS)) for k in range(12)]


def check(llm: LLM, family, jobs) -> None:
    _, adapters, expected = family
    assert run(llm, adapters, jobs) == [expected[job] for job in jobs]


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_single_adapter_matches_peft(family, name):
    base, _, _ = family
    llm = LLM(model=base, skip_tokenizer_init=True, enable_lora=True, max_model_len=128)
    check(llm, family, [(name, i) for i in range(len(PROMPTS))])


def test_mixed_batch_base_and_three_adapters(family):
    base, _, _ = family
    llm = LLM(model=base, skip_tokenizer_init=True, enable_lora=True, max_loras=3, max_model_len=128)
    check(llm, family, mixed_jobs())


def test_few_slots_and_small_host_cache(family):
    """max_loras=1: the scheduler runs one adapter at a time beside the base; max_cpu_loras=1: adapters are read
    from their folders again after eviction. Same tokens."""
    base, _, _ = family
    llm = LLM(model=base, skip_tokenizer_init=True, enable_lora=True, max_loras=1, max_cpu_loras=1,
              max_model_len=128)
    check(llm, family, mixed_jobs())


def test_chunked_prefill(family):
    base, _, _ = family
    llm = LLM(model=base, skip_tokenizer_init=True, enable_lora=True, max_loras=3, max_model_len=128,
              max_num_batched_tokens=16, max_num_seqs=4)
    check(llm, family, mixed_jobs())


def test_preemption(family):
    base, _, _ = family
    llm = LLM(model=base, skip_tokenizer_init=True, enable_lora=True, max_loras=3, max_model_len=64,
              block_size=4, num_gpu_blocks_override=16, max_num_batched_tokens=64)
    check(llm, family, mixed_jobs())
    assert llm.engine.scheduler.num_preemptions > 0


def test_prefix_cache_isolated_between_adapters(family):
    """The same long prompt under each adapter and the base, one after another: each gets its own tokens, and the
    only prefix-cache hits are a request's own adapter's."""
    base, adapters, expected = family
    llm = LLM(model=base, skip_tokenizer_init=True, enable_lora=True, max_loras=3, max_model_len=128, block_size=4)
    kv_cache = llm.engine.kv_cache
    for name in ["a8", "b16", None, "c4"]:
        hits_before = kv_cache.prefix_cache_hits
        assert run(llm, adapters, [(name, 2)]) == [expected[(name, 2)]]
        assert kv_cache.prefix_cache_hits == hits_before  # a new adapter: nothing to share
    hits_before = kv_cache.prefix_cache_hits
    assert run(llm, adapters, [("b16", 2)]) == [expected[("b16", 2)]]
    assert kv_cache.prefix_cache_hits > hits_before  # its own adapter's blocks are reused


def test_triton_kernels_in_the_engine(family, monkeypatch):
    """The Triton kernels (in the interpreter) in place of the torch reference: the same tokens."""
    monkeypatch.setenv("SERVAL_LORA", "triton")
    base, _, _ = family
    llm = LLM(model=base, skip_tokenizer_init=True, enable_lora=True, max_loras=3, max_model_len=128)
    assert llm.engine.lora.lora_layers.context.use_triton
    check(llm, family, mixed_jobs()[:8])


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_families(tmp_path, arch):
    hf = build_tiny_model(tmp_path / "base", arch)
    model = build_adapter(hf, tmp_path / "adapter", rank=16, alpha=32, seed=5)
    llm = LLM(model=str(tmp_path / "base"), skip_tokenizer_init=True, enable_lora=True, max_model_len=128)
    request = LoRARequest("adapter", 1, str(tmp_path / "adapter"))
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:2]], params(), use_tqdm=False,
                           lora_request=request)
    assert [o.outputs[0].token_ids for o in outputs] == [greedy(model, p, MAX_TOKENS) for p in PROMPTS[:2]]


def test_lora_request_without_enable_lora(family):
    from serval.openai.errors import InvalidArgument
    base, adapters, _ = family
    llm = LLM(model=base, skip_tokenizer_init=True, max_model_len=128)
    with pytest.raises(InvalidArgument, match="enable_lora"):
        run(llm, adapters, [("a8", 0)])
