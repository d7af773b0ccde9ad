"""Verify steps in the captured-graph shape (serval.engine.spec_decode.verify_graphs): every request padded to k + 1
rows, padding requests up to a ladder size, inputs from fixed buffers. On the CPU the same padded forward runs
eagerly through the Triton kernels in the interpreter; each step is checked against the plain (unpadded) verify
forward (on the torch attention, as are prefills: tests/engine/attention_reference.py), and the tokens against
transformers. On a GPU the captured graphs are checked against eager steps."""
import pytest
import torch

from serval import LLM, SamplingParams
from serval.engine.spec_decode.config import parse_speculative_config
from serval.engine.spec_decode.verify_graphs import VerifyGraphs, max_verify_batch
from tests.engine.attention_reference import eager_steps_on_reference, reference_generate
from tests.engine.spec_decode.test_spec_engine import hf_prompt_lookup, repetitive_prompts
from tests.engine.test_engine import hf_greedy, make_prompts, pressured_llm

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
# The graph-shaped forward run eagerly, compared at 1e-4 with the plain forward and token for token with transformers
# in float32: on a GPU the padded and the plain batch (different row counts) take different GEMV/GEMM kernels or
# configurations, so a different summation order (measured ~2e-2 apart in these logits on an H200, and greedy
# tokens that flip); there test_gpu_verify_graphs_equal_eager_verify checks the graphs.
interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's float32 path; see above")
NUM_NEW_TOKENS = 10
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}


def graph_shaped(llm: LLM, num_speculative_tokens: int) -> list[list[int]]:
    """Give the engine's runner uncaptured verify graphs (their eager, padded forward), each step also run through
    the plain forward and compared; returns each step's rows per request. Eager steps attend with the torch
    reference."""
    runner = llm.engine.runner
    config = llm.engine.config
    graphs = VerifyGraphs(runner.model, runner.kv_caches, runner.block_size, config.max_num_seqs,
                          config.max_model_len, num_speculative_tokens + 1, runner.device)
    steps = []

    def run_and_compare(inputs):
        expected = runner.forward_logits(inputs)  # writes the same K/V the padded forward then writes again
        got = VerifyGraphs.run(graphs, inputs)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        starts = inputs.query_start_loc
        steps.append([end - start for start, end in zip(starts, starts[1:])])
        return got

    graphs.run = run_and_compare
    runner.verify_graphs = graphs
    eager_steps_on_reference(runner)
    return steps


@interpreter_only
def test_graph_shaped_verify_equals_plain_verify_and_transformers(tiny_models, monkeypatch):
    """Batches of 1-4 requests (a ladder of 1, 2, 4: three requests pad a whole one), drafts of 0 to k tokens side by
    side (requests padded within), prefill chunks, preemption and prefix hits."""
    pytest.importorskip("triton")
    monkeypatch.setenv("SERVAL_ATTENTION_BACKEND", "triton")
    path, hf_model = tiny_models("llama")
    prompts = repetitive_prompts(hf_model.config.vocab_size)
    llm = pressured_llm(path, True, speculative_config=NGRAM)
    steps = graph_shaped(llm, NGRAM["num_speculative_tokens"])
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    # Six long prompts preempt one another; then three short ones decode side by side.
    for group in ((1, 6, 8, 9, 10, 11), (2, 3, 4)):
        chosen = [prompts[i] for i in group]
        outputs = llm.generate([{"prompt_token_ids": p} for p in chosen], params, use_tqdm=False)
        for prompt, output in zip(chosen, outputs):
            expected = hf_prompt_lookup(hf_model, prompt, NUM_NEW_TOKENS)
            assert expected == hf_greedy(hf_model, prompt, NUM_NEW_TOKENS)
            assert output.outputs[0].token_ids == expected, f"prompt of {len(prompt)}"
    stats = llm.engine.get_stats()
    assert stats.spec_decode.num_accepted_tokens > 0 and stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    full = NGRAM["num_speculative_tokens"] + 1
    assert any(len(step) == 3 for step in steps), "a batch padded with a whole request"
    assert any(1 < rows < full for step in steps for rows in step), "a request with fewer drafts than k"
    assert any(full in step and 1 in step for step in steps), "drafts beside a request without any"
    assert stats.num_free_blocks == stats.num_blocks
    llm.engine.kv_cache.check_invariants([])


@interpreter_only
def test_graph_shaped_verify_with_logprobs_and_sampling(tiny_models, monkeypatch):
    """Logprobs of the verified tokens and seeded sampling at temperature 1 come out of the padded forward as out of
    the plain one (the same engine with the same seeds, without the graph shape)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("SERVAL_ATTENTION_BACKEND", "triton")
    path, hf_model = tiny_models("llama")
    prompts = [repetitive_prompts(hf_model.config.vocab_size)[i] for i in (3, 6, 8)]
    params = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=7),
              SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8, ignore_eos=True, seed=11, logprobs=1)]
    requests = [{"prompt_token_ids": p} for p in prompts]
    plain = reference_generate(pressured_llm(path, True, speculative_config=NGRAM), requests, params)
    llm = pressured_llm(path, True, speculative_config=NGRAM)
    steps = graph_shaped(llm, NGRAM["num_speculative_tokens"])
    got = llm.generate(requests, params, use_tqdm=False)
    assert steps
    for want, have in zip(plain, got):
        assert have.outputs[0].token_ids == want.outputs[0].token_ids
        if want.outputs[0].logprobs is not None:
            for entry_a, entry_b in zip(want.outputs[0].logprobs, have.outputs[0].logprobs):
                assert entry_a.keys() == entry_b.keys()
                for token in entry_a:
                    assert entry_b[token].logprob == pytest.approx(entry_a[token].logprob, abs=1e-4)


@interpreter_only
def test_graph_shaped_verify_of_one_request_with_k_drafts(tiny_models, monkeypatch):
    """One request verifying k drafts a step (the replay proposer at acceptance 1): its rows are the padded buffer's
    first k + 1, which the step reads as a view rather than gathers; each step is checked against the plain
    forward, and the tokens against transformers."""
    pytest.importorskip("triton")
    monkeypatch.setenv("SERVAL_ATTENTION_BACKEND", "triton")
    path, hf_model = tiny_models("llama")
    prompt = repetitive_prompts(hf_model.config.vocab_size)[3]
    expected = hf_greedy(hf_model, prompt, NUM_NEW_TOKENS)
    k = NGRAM["num_speculative_tokens"]
    llm = pressured_llm(path, True, speculative_config={"method": "replay", "num_speculative_tokens": k,
                                                        "acceptance_rate": 1.0})
    llm.engine.spec_decoder.replay.add_continuation(prompt, expected)
    steps = graph_shaped(llm, k)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    output = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    assert output.outputs[0].token_ids == expected
    assert [k + 1] in steps, "a step of one request with k drafts"


def test_the_torch_reference_is_refused(tiny_models, monkeypatch):
    """The torch reference's write_kv has no slot -1 skip: the padded shape would overwrite a live slot."""
    monkeypatch.setenv("SERVAL_ATTENTION_BACKEND", "torch")
    path, _ = tiny_models("llama")
    llm = pressured_llm(path, True, speculative_config=NGRAM)
    runner = llm.engine.runner
    with pytest.raises(ValueError, match="Triton"):
        VerifyGraphs(runner.model, runner.kv_caches, runner.block_size, 4, 128, 4, runner.device)


def test_verify_graph_batches_stop_where_speculation_does():
    config = parse_speculative_config(NGRAM)
    assert max_verify_batch(256, config) == 64
    assert max_verify_batch(8, config) == 8
    limited = parse_speculative_config({**NGRAM, "disable_by_batch_size": 17})
    assert max_verify_batch(256, limited) == 16


# ---- on a GPU: captured graphs against eager steps ----
def cuda_generate(path: str, prompts, params, **engine_args) -> list:
    llm = LLM(model=path, skip_tokenizer_init=True, block_size=4, max_model_len=256, device="cuda", dtype="float32",
              max_num_seqs=12, num_gpu_blocks_override=2048, **engine_args)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return llm, [output.outputs[0].token_ids for output in outputs]


@requires_cuda
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_gpu_verify_graphs_equal_eager_verify(tiny_models, arch):
    path, hf_model = tiny_models(arch)
    prompts = repetitive_prompts(hf_model.config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    _, eager = cuda_generate(path, prompts, params, speculative_config=NGRAM, enforce_eager=True)
    llm, graphs = cuda_generate(path, prompts, params, speculative_config=NGRAM)
    assert llm.engine.runner.verify_graphs is not None and llm.engine.runner.verify_graphs.graphs
    assert graphs == eager
    assert llm.engine.get_stats().spec_decode.num_accepted_tokens > 0
    for prompt, tokens in zip(prompts[:4], graphs):
        assert tokens == hf_greedy(hf_model, prompt, 24)


@requires_cuda
def test_gpu_draft_model_graphs_equal_eager(tiny_models):
    """The draft's decode steps replayed from its own graphs: the target as its own draft is always accepted, and the
    outputs are the eager engine's."""
    path, hf_model = tiny_models("qwen3")
    prompts = make_prompts(hf_model.config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    config = {"method": "draft_model", "model": path, "num_speculative_tokens": 3}
    _, eager = cuda_generate(path, prompts, params, speculative_config=config, enforce_eager=True)
    llm, graphs = cuda_generate(path, prompts, params, speculative_config=config)
    assert llm.engine.runner.drafter.graphs is not None
    assert graphs == eager
    spec = llm.engine.get_stats().spec_decode
    assert spec.num_draft_tokens > 30 and spec.num_accepted_tokens == spec.num_draft_tokens
