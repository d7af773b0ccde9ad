"""The EAGLE-3 head's steps in the captured-graph shape (serval.engine.spec_decode.eagle3_graphs): one row a request
for chain steps, k + 1 rows a request (padded) for the pass after a verify step, batches padded to a ladder size,
inputs from fixed buffers. On the CPU the same padded forward runs eagerly through the Triton kernels in the
interpreter; every head step is checked against the plain (unpadded) head step, and the tokens against
transformers. (The target's graph-shaped verify steps leaving the head its hidden states: test_eagle3.py.) On a GPU the
captured graphs are checked against eager steps."""
import pytest
import torch

from serval import LLM, SamplingParams
from serval.engine.spec_decode.eagle3_graphs import HeadGraphs
from serval.layers.attention import Attention, attention_backend
from tests.engine.attention_reference import reference_attention
from tests.engine.spec_decode.test_eagle3 import head, recorded_drafts, target  # noqa: F401 (fixtures)
from tests.engine.spec_decode.test_verify_graphs import requires_cuda
from tests.engine.test_engine import hf_greedy, make_prompts, pressured_llm

NUM_DRAFTS = 3


def graph_shaped_head(llm) -> list[tuple[int, list[int]]]:
    """Give the engine's EAGLE-3 drafter uncaptured head graphs (their eager, padded forward), each step also run
    op by op and compared; returns each step's (Q, rows per request). The head's eager steps attend with the torch
    reference."""
    drafter = llm.engine.runner.drafter
    drafter.use_graphs(llm.engine.config.max_num_seqs, llm.engine.config.max_model_len)
    steps = []
    run_eager = drafter.run_eager

    def run_eager_on_reference(step, draft_rows):
        with reference_attention(drafter.model):
            return run_eager(step, draft_rows)

    drafter.run_eager = run_eager_on_reference  # the head's passes over prefill chunks, and the comparisons

    def run_and_compare(graphs, step, draft_rows):
        expected = drafter.run_eager(step, draft_rows)  # writes the K/V the padded forward then writes again
        got = HeadGraphs.run(graphs, step, draft_rows)
        assert got.token_ids == expected.token_ids
        torch.testing.assert_close(got.prenorm, expected.prenorm, rtol=1e-4, atol=1e-4)
        starts = step.query_start_loc
        steps.append((graphs.num_query_tokens, [end - start for start, end in zip(starts, starts[1:])]))
        return got

    for graphs in (drafter.graphs, drafter.verify_pass_graphs):
        graphs.run = lambda step, draft_rows, graphs=graphs: run_and_compare(graphs, step, draft_rows)
    return steps


def partly_right_drafts(llm, continuations: dict[tuple, list[int]]) -> None:
    """After the head drafts (its steps still run), make the first i drafts the target's own greedy tokens and the
    rest wrong, i cycling through 0..k: a random head's drafts are all rejected, and the head's pass after a verify
    step must see every number of kept rows."""
    drafter = llm.engine.runner.drafter
    propose = drafter.propose
    num_calls = [0]

    def propose_then_correct(requests):
        propose(requests)
        for request in requests:
            num_right = num_calls[0] % (NUM_DRAFTS + 1)
            num_calls[0] += 1
            done = len(request.output_token_ids)
            truth = continuations[tuple(request.prompt_token_ids)][done:done + len(request.spec_token_ids)]
            request.spec_token_ids[:] = [token if j < num_right else (token + 1) % llm.engine.vocab_size
                                         for j, token in enumerate(truth)]

    drafter.propose = propose_then_correct


def test_graph_shaped_head_steps_equal_eager_head_steps(target, head, monkeypatch):
    """Every head step (chain steps, and the pass after each verify step with 1..k+1 kept rows a request) run in its
    graph shape and op by op: the same drafts and pre-norm outputs; the tokens are transformers'. Three requests pad
    a batch of 4. The head's attention runs the Triton kernels (interpreted) and the target the torch reference."""
    pytest.importorskip("triton")
    monkeypatch.setenv("SERVAL_ATTENTION_BACKEND", "triton")
    path, hf_model = target
    prompts = [make_prompts(hf_model.config.vocab_size)[i] for i in (2, 4, 5)]
    num_new_tokens = 8
    continuations = {tuple(p): hf_greedy(hf_model, p, num_new_tokens + NUM_DRAFTS) for p in prompts}
    llm = pressured_llm(path, True, speculative_config={"method": "eagle3", "model": head[0],
                                                        "num_speculative_tokens": NUM_DRAFTS})
    head_steps = graph_shaped_head(llm)
    for module in llm.engine.runner.drafter.model.modules():
        if isinstance(module, Attention):
            module._backend = attention_backend(torch.device("cpu"))
    monkeypatch.setenv("SERVAL_ATTENTION_BACKEND", "torch")  # the target's layers choose theirs on first use
    drafts = recorded_drafts(llm)
    partly_right_drafts(llm, continuations)
    params = SamplingParams(temperature=0.0, max_tokens=num_new_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == continuations[tuple(prompt)][:num_new_tokens]
    assert drafts
    stats = llm.engine.get_stats()
    assert stats.spec_decode.num_accepted_tokens > 0 and stats.num_free_blocks == stats.num_blocks
    chain_steps = [rows for q, rows in head_steps if q == 1]
    verify_passes = [rows for q, rows in head_steps if q == NUM_DRAFTS + 1]
    assert chain_steps and verify_passes
    assert any(len(rows) == 3 for rows in chain_steps + verify_passes), "a batch padded with a whole request"
    assert any(0 < r < NUM_DRAFTS + 1 for rows in verify_passes for r in rows), "rows padded within a request"
    assert any(NUM_DRAFTS + 1 in rows for rows in verify_passes), "every draft accepted"


def test_the_torch_reference_is_refused(target, head, monkeypatch):
    """The torch reference's write_kv has no slot -1 skip: the padded shape would overwrite a live slot."""
    monkeypatch.setenv("SERVAL_ATTENTION_BACKEND", "torch")
    llm = pressured_llm(target[0], True, speculative_config={"method": "eagle3", "model": head[0],
                                                              "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="Triton"):
        llm.engine.runner.drafter.use_graphs(4, 128)


@requires_cuda
def test_gpu_head_graphs_equal_eager_head(target, head):
    """The head's captured graphs (chain steps and the verify pass) against the eager engine: the same drafts and
    outputs, and transformers' greedy tokens."""
    path, hf_model = target
    prompts = make_prompts(hf_model.config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    config = {"method": "eagle3", "model": head[0], "num_speculative_tokens": NUM_DRAFTS}
    runs = []
    for enforce_eager in (True, False):
        llm = LLM(model=path, skip_tokenizer_init=True, block_size=4, max_model_len=256, device="cuda",
                  dtype="float32", max_num_seqs=12, num_gpu_blocks_override=2048, speculative_config=config,
                  enforce_eager=enforce_eager)
        drafts = recorded_drafts(llm)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        runs.append((drafts, [output.outputs[0].token_ids for output in outputs]))
    drafter = llm.engine.runner.drafter
    assert drafter.graphs.graphs and drafter.verify_pass_graphs.graphs
    (eager_drafts, eager_tokens), (drafts, tokens) = runs
    assert len(drafts) > 30 and drafts == eager_drafts
    assert tokens == eager_tokens
    for prompt, output in zip(prompts[:4], tokens):
        assert output == hf_greedy(hf_model, prompt, 16)
