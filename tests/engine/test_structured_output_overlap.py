"""Grammar work off the step's critical path: with asynchronous scheduling a constrained batch queues step N+1's
forward before step N's tokens are on the host, feeds each grammar its token as soon as it is, fills the next masks
on a worker thread and samples once they are ready. The outputs must be the synchronous engine's, token for token,
under batching with unconstrained rows, grammars that end mid-batch, min_tokens, penalties and aborts; and the
masks taken from a fill must equal a fresh fill of the same matchers."""
import json
import re

import jsonschema
import pytest
import torch

from serval import LLM
from serval.engine import structured_output as structured
from serval.engine.cuda_graphs import DecodeGraphs
from serval.sampling_params import SamplingParams, StructuredOutputsParams
from tests.e2e.server import tiny_model_dir

# Bounded: a random-weight model picks among the allowed tokens almost uniformly, so free strings never close.
ITEM = {"type": "object", "additionalProperties": False, "required": ["id", "ok"],
        "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}, "ok": {"type": "boolean"},
                       "tag": {"enum": ["a", "bb", "ccc"]}}}
CODE = r"[A-Z]{2}-[0-9]{2,5}"
CHOICES = ["yes", "no", "maybe"]


def constrained(**kwargs) -> StructuredOutputsParams:
    return StructuredOutputsParams(**kwargs)


def mixed_batch() -> list[tuple[str, SamplingParams]]:
    """Constrained and unconstrained rows in one batch; the choices end after a token or two, the schema and the
    regex much later, the plain rows at max_tokens: grammars stop while the rest go on."""
    return [
        ("Item:", SamplingParams(temperature=1.0, seed=1, max_tokens=40, structured_outputs=constrained(json=ITEM))),
        ("Code:", SamplingParams(temperature=1.0, seed=2, max_tokens=30, structured_outputs=constrained(regex=CODE))),
        ("Pick:", SamplingParams(temperature=1.0, seed=3, max_tokens=10,
                                 structured_outputs=constrained(choice=CHOICES))),
        ("Free text", SamplingParams(temperature=1.0, seed=4, max_tokens=24, ignore_eos=True)),
        ("Greedy", SamplingParams(temperature=0.0, max_tokens=18, ignore_eos=True)),
        ("Pick again:", SamplingParams(temperature=0.0, max_tokens=10, structured_outputs=constrained(choice=CHOICES))),
        ("Item, n=2:", SamplingParams(temperature=0.9, seed=5, n=2, max_tokens=40, top_k=50,
                                      structured_outputs=constrained(json=ITEM))),
        ("Penalized", SamplingParams(temperature=0.0, max_tokens=16, repetition_penalty=1.3, ignore_eos=True)),
        ("Code, min_tokens:", SamplingParams(temperature=1.0, seed=6, max_tokens=30, min_tokens=4,
                                             structured_outputs=constrained(regex=CODE))),
    ]


def make_llm(async_scheduling: bool) -> LLM:
    return LLM(model=tiny_model_dir(), max_model_len=256, max_num_seqs=16, block_size=4,
               async_scheduling=async_scheduling)


def counted_deferred_launches(engine) -> list[bool]:
    """Wrap the engine's real launch_forward to count forwards queued ahead of their sampling."""
    calls = []
    launch = engine.runner.launch_forward

    def counting(requests, previous=None, **kwargs):
        calls.append(previous is not None and any(request.grammar is not None for request in requests))
        return launch(requests, previous, **kwargs)

    engine.runner.launch_forward = counting
    return calls


def summary(outputs) -> list[list[tuple]]:
    return [[(c.token_ids, c.text, c.finish_reason) for c in output.outputs] for output in outputs]


@pytest.fixture(scope="module")
def synchronous():
    llm = make_llm(False)
    batch = mixed_batch()
    return summary(llm.generate([p for p, _ in batch], [s for _, s in batch], use_tqdm=False))


def test_overlapped_grammar_steps_give_the_synchronous_outputs(synchronous):
    llm = make_llm(True)
    deferred = counted_deferred_launches(llm.engine)
    batch = mixed_batch()
    overlapped = summary(llm.generate([p for p, _ in batch], [s for _, s in batch], use_tqdm=False))
    assert overlapped == synchronous
    assert sum(deferred) > 10, "constrained steps were meant to be queued ahead of their sampling"
    # The constraints hold, and the choices ended (matcher stopped) while the others went on.
    for choice in overlapped[0] + overlapped[6]:
        jsonschema.validate(json.loads(choice[1]), ITEM)
    assert re.fullmatch(CODE, overlapped[1][0][1]) and re.fullmatch(CODE, overlapped[8][0][1])
    assert len(overlapped[8][0][0]) >= 4
    for index in (2, 5):
        assert overlapped[index][0][1] in CHOICES and overlapped[index][0][2] == "stop"
        assert len(overlapped[index][0][0]) < len(overlapped[3][0][0])
    assert overlapped[3][0][2] == "length" and len(overlapped[3][0][0]) == 24
    engine = llm.engine
    assert engine.in_flight is None and engine.queued_forward is None
    stats = engine.get_stats()
    assert stats.num_free_blocks == stats.num_blocks
    engine.kv_cache.check_invariants([])


def test_steps_staged_into_the_decode_graphs_buffers_give_the_synchronous_outputs(monkeypatch):
    """A constrained batch stages step N + 2's inputs into the decode graphs' buffers before step N + 1's sampling
    (ModelRunner.stage_forward), then replays. Here the graphs' buffers run eagerly on the CPU, through the Triton
    kernels in the interpreter (they read every length from those buffers, as captured graphs do): the outputs
    are the synchronous engine's on the same kernels, token for token."""
    monkeypatch.setenv("SERVAL_ATTENTION_BACKEND", "triton")
    batch = mixed_batch()[:4]
    expected = summary(make_llm(False).generate([p for p, _ in batch], [s for _, s in batch], use_tqdm=False))
    llm = make_llm(True)
    runner = llm.engine.runner
    runner.graphs = DecodeGraphs(runner.model, runner.kv_caches, runner.block_size, 16, 256, runner.device)
    deferred = counted_deferred_launches(llm.engine)  # with graphs, each of these replays a staged step
    staged = summary(llm.generate([p for p, _ in batch], [s for _, s in batch], use_tqdm=False))
    assert staged == expected
    assert sum(deferred) > 5, "constrained steps were meant to be staged, then replayed"
    engine = llm.engine
    assert engine.in_flight is None and engine.queued_forward is None
    engine.kv_cache.check_invariants([])


def test_abort_while_the_next_masks_are_pending(synchronous):
    """Aborts land between steps (the engine loop applies them), when a step is queued and the forward after it
    waits for its masks: the aborted request is dropped from both, the others end as the synchronous engine's."""
    llm = make_llm(True)
    engine = llm.engine
    batch = mixed_batch()
    for index, (prompt, params) in enumerate(batch):
        engine.add_request(str(index), prompt, params)
    finished = {}

    def step() -> None:
        finished.update((output.request_id, output) for output in engine.step() if output.finished)

    for _ in range(200):
        step()
        if engine.queued_forward is not None and any(r.parent_request_id == "0"
                                                     for r in engine.queued_forward.requests):
            break
    (aborted,) = [r for r in engine.queued_forward.requests if r.parent_request_id == "0"]
    assert aborted.grammar is not None and aborted.grammar.num_consumed > 0
    engine.abort_request("0")
    while engine.has_unfinished_requests():
        step()
    engine.step()  # whatever is still queued is read and dropped
    assert sorted(finished, key=int) == [str(i) for i in range(1, len(batch))]
    for request_id, output in finished.items():
        assert summary([output])[0] == synchronous[int(request_id)]
    assert engine.in_flight is None and engine.queued_forward is None
    stats = engine.get_stats()
    assert stats.num_free_blocks == stats.num_blocks
    engine.kv_cache.check_invariants([])


# ---------------------------------------------------------------- the mask fill itself
@pytest.fixture(scope="module")
def compiler():
    return structured.GrammarCompiler(make_llm(False).get_tokenizer())


def walked_states(compiler, count: int) -> list[structured.GrammarState]:
    """States of a JSON-schema grammar at different positions, the first few complete (stopped)."""
    states = []
    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        state = compiler.new_state(constrained(json=ITEM) if index % 3 else constrained(choice=CHOICES))
        for _ in range(index):
            if state.stopped:
                break
            allowed = structured.allowed_mask(structured.fill_bitmask([state.matcher], state.vocab_size),
                                              state.vocab_size)[0]
            allowed[compiler.ll_tokenizer.eos_token] = False
            candidates = allowed.nonzero().flatten()
            if not len(candidates):
                break
            token = int(candidates[torch.randint(len(candidates), (1,), generator=generator)])
            assert state.advance(token)
        states.append(state)
    return states


def test_masks_from_a_fill_equal_a_fresh_fill(compiler):
    states = walked_states(compiler, 12)
    assert any(state.stopped for state in states) and not all(state.stopped for state in states)
    fresh = structured.fill_bitmask([state.matcher for state in states], states[0].vocab_size)
    structured.start_mask_fill(states)
    prefetched = structured.next_token_bitmask(states)
    assert torch.equal(prefetched, fresh)
    assert all(state.pending is None for state in states)
    # A subset, in another order: the rows are gathered from the fill.
    structured.start_mask_fill(states)
    order = [5, 1, 7]
    assert torch.equal(structured.next_token_bitmask([states[i] for i in order]), fresh[order])


def test_a_state_that_moved_on_since_its_fill_is_filled_again(compiler):
    states = [state for state in walked_states(compiler, 8) if not state.stopped]
    structured.start_mask_fill(states)
    moved = states[-1]
    moved.wait_for_fill()  # llguidance lends a matcher to one fill at a time ("Already borrowed")
    allowed = structured.allowed_mask(structured.fill_bitmask([moved.matcher], moved.vocab_size),
                                      moved.vocab_size)[0]
    allowed[compiler.ll_tokenizer.eos_token] = False
    assert moved.advance(int(allowed.nonzero()[0]))
    fresh = structured.fill_bitmask([state.matcher for state in states], moved.vocab_size)
    assert torch.equal(structured.next_token_bitmask(states), fresh)


def test_a_token_fed_ahead_is_reported_once_by_advance(compiler):
    (state,) = [s for s in walked_states(compiler, 5) if not s.stopped][-1:]
    twin = state.matcher.deep_copy()
    allowed = structured.allowed_mask(structured.fill_bitmask([twin], state.vocab_size), state.vocab_size)[0]
    allowed[compiler.ll_tokenizer.eos_token] = False
    token = int(allowed.nonzero()[-1])
    state.consume(token)
    structured.start_mask_fill([state])
    assert state.advance(token) and state.num_consumed == state.num_reported
    assert twin.consume_token(token)
    assert torch.equal(structured.next_token_bitmask([state]),
                       structured.fill_bitmask([twin], state.vocab_size))
    state.consume(token)
    with pytest.raises(RuntimeError, match="fed ahead"):
        state.advance(token + 1)


def test_tokens_fed_by_the_fill_worker_equal_one_token_at_a_time(compiler):
    """start_mask_fill's fed: the worker feeds each state its token, then fills; every state ends as its own
    consume() would leave it (the tokens taken, one rejected: its matcher then in error), and the masks are a
    fresh fill's after the tokens, the rejecting and stopped states' too (end-of-sequence alone)."""
    states = [state for state in walked_states(compiler, 12) if not state.stopped]
    twins = [structured.GrammarState(state.matcher.deep_copy(), state.vocab_size, state.digest, state.num_consumed,
                                     state.num_reported) for state in states]
    bitmask = structured.fill_bitmask([state.matcher for state in states], states[0].vocab_size)
    allowed = structured.allowed_mask(bitmask, states[0].vocab_size)
    tokens = [int(row.nonzero()[-1]) for row in allowed]
    tokens[0] = int((~allowed[0]).nonzero()[0])  # one the grammar rejects
    # The last state's token is fed but its mask not filled (a request at its length limit).
    fill = structured.start_mask_fill(states[:-1], fed=states, fed_token_ids=tokens)
    for twin, token in zip(twins, tokens):
        twin.consume(token)
    assert [(s.accepted, s.stopped, s.error, s.num_consumed, s.last_token_id) for s in states] == \
        [(t.accepted, t.stopped, t.error, t.num_consumed, t.last_token_id) for t in twins]
    assert not states[0].accepted and states[0].error
    assert any(twin.stopped for twin in twins), "a choice was meant to end with its token"
    assert torch.equal(fill.wait(), structured.fill_bitmask([t.matcher for t in twins[:-1]], states[0].vocab_size))
    assert torch.equal(structured.next_token_bitmask(states[:-1]), fill.bitmask)
    assert all(state.advance(token) == twin.advance(token) for state, twin, token in zip(states, twins, tokens))


def test_a_failed_feed_fails_the_status_reads(compiler):
    """An error on the worker reaches whoever reads a fed state (the output processor's advance), as a fill's
    reaches the sampler: the step fails."""
    (state,) = [s for s in walked_states(compiler, 5) if not s.stopped][-1:]
    state.wait_for_fill()
    structured.start_mask_fill([state], fed=[state], fed_token_ids=[-1])  # not a token id: llguidance raises
    with pytest.raises(RuntimeError, match="grammar mask fill failed"):
        state.advance(-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the one-launch bitmask kernel runs on a GPU")
def test_gpu_constrained_greedy_equals_the_cpu_engine():
    """On a GPU the sampler masks with one Triton launch (serval.kernels.triton_bitmask) instead of the CPU's
    unpack and masked_fill: greedy constrained rows, mixed with unconstrained ones (the kernel's row-index form)
    and alone (its whole-batch form), give the CPU engine's tokens in float32."""
    greedy = [("Item:", SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=constrained(json=ITEM))),
              ("Code:", SamplingParams(temperature=0.0, max_tokens=30, structured_outputs=constrained(regex=CODE))),
              ("Pick:", SamplingParams(temperature=0.0, max_tokens=10, structured_outputs=constrained(choice=CHOICES))),
              ("Free text", SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))]
    results = {}
    for device in ("cpu", "cuda"):
        llm = LLM(model=tiny_model_dir(), max_model_len=256, max_num_seqs=16, block_size=4, device=device,
                  dtype="float32", **({"num_gpu_blocks_override": 512} if device == "cuda" else {}))
        mixed = summary(llm.generate([p for p, _ in greedy], [s for _, s in greedy], use_tqdm=False))
        alone = summary(llm.generate([p for p, _ in greedy[:3]], [s for _, s in greedy[:3]], use_tqdm=False))
        results[device] = (mixed, alone)
    assert results["cuda"] == results["cpu"]
    jsonschema.validate(json.loads(results["cuda"][0][0][0][1]), ITEM)
