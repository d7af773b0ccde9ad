"""Speculative decoding with structured outputs: each verify row masked by the grammar after the drafts before it,
drafts the grammar rejects cut when proposed, the matcher left holding exactly the accepted tokens. Greedy
constrained requests equal the engine without speculation token for token (ngram, suffix, replay; mixed batches,
chunked prefill, preemption, prefix hits); at temperature 1 the first tokens follow the masked target distribution
(chi-square on a tiny model with a real vocabulary)."""
import json
import re
from collections import Counter

import jsonschema
import pytest
import torch
import transformers

from serval import LLM, SamplingParams
from serval.engine import structured_output as structured
from serval.engine.request import Request
from serval.engine.spec_decode.config import SpeculativeConfig
from serval.engine.spec_decode.decoder import SpecDecoder
from serval.engine.spec_decode.rejection_sampler import verify
from serval.sampling_params import StructuredOutputsParams
from tests.e2e.server import tiny_model_dir
from tests.engine.spec_decode.stats import SIGNIFICANCE, chi_square_p_value, reference_probs

# Bounded: a random-weight model picks among the allowed tokens almost uniformly, so free strings never close.
ITEM = {"type": "object", "additionalProperties": False, "required": ["id", "ok"],
        "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}, "ok": {"type": "boolean"},
                       "tag": {"enum": ["a", "bb", "ccc"]}}}
CODES = r"([A-Z]{2}-[0-9]{2,4} ){2,6}"
CHOICES = ["yes", "no", "yes no yes no", "maybe"]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}
SUFFIX = {"method": "suffix", "num_speculative_tokens": 4}
REPLAY = {"method": "replay", "num_speculative_tokens": 4, "acceptance_rate": 0.7, "seed": 1}
# The target as its own draft model: its drafts are the unconstrained argmax, which the grammar often forbids (such
# drafts are not cut when proposed; their row's mask rejects them).
DRAFT_MODEL = {"method": "draft_model", "num_speculative_tokens": 3}


def constrained(**kwargs) -> StructuredOutputsParams:
    return StructuredOutputsParams(**kwargs)


def mixed_batch() -> list[tuple[str, SamplingParams]]:
    """Greedy constrained requests (some with logprobs, min_tokens, n = 2, or opted out of speculation) beside
    unconstrained and penalized ones, prompts that repeat what the grammar lets the model write."""
    return [
        ('{"id":7,"ok":true} {"id":7,"ok":true} {"id":', SamplingParams(
            temperature=0.0, max_tokens=40, structured_outputs=constrained(json=ITEM))),
        ("AA-77 OC-77 HI-77 AA-77 OC-77", SamplingParams(
            temperature=0.0, max_tokens=36, structured_outputs=constrained(regex=CODES))),
        ("yes no yes no yes no", SamplingParams(
            temperature=0.0, max_tokens=12, structured_outputs=constrained(choice=CHOICES))),
        ("Item item item:", SamplingParams(
            temperature=0.0, max_tokens=40, logprobs=2, structured_outputs=constrained(json=ITEM))),
        ("Free text free text", SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)),
        ("Codes again, no drafts:", SamplingParams(
            temperature=0.0, max_tokens=30, disable_speculation=True, structured_outputs=constrained(regex=CODES))),
        ("Penalized text", SamplingParams(temperature=0.0, max_tokens=20, repetition_penalty=1.3, ignore_eos=True)),
        ("Codes, at least six:", SamplingParams(
            temperature=0.0, max_tokens=30, min_tokens=6, structured_outputs=constrained(regex=CODES))),
        ("Twice the item:", SamplingParams(
            temperature=0.0, n=2, max_tokens=40, structured_outputs=constrained(json=ITEM))),
    ]


def make_llm(speculative_config: dict | None) -> LLM:
    if speculative_config is not None and speculative_config["method"] == "draft_model":
        speculative_config = {**speculative_config, "model": tiny_model_dir()}
    # A small pool and token budget: prompts are chunked, requests preempted, prefixes hit.
    return LLM(model=tiny_model_dir(), max_model_len=96, max_num_seqs=4, max_num_batched_tokens=32, block_size=4,
               num_gpu_blocks_override=24, enable_prefix_caching=True, speculative_config=speculative_config)


def generate(llm: LLM, batch):
    return llm.generate([prompt for prompt, _ in batch], [params for _, params in batch], use_tqdm=False)


@pytest.fixture(scope="module")
def reference():
    return generate(make_llm(None), mixed_batch())


@pytest.mark.parametrize("speculative_config", [NGRAM, SUFFIX, REPLAY, DRAFT_MODEL],
                         ids=["ngram", "suffix", "replay", "draft-model"])
def test_greedy_constrained_equals_the_engine_without_speculation(reference, speculative_config):
    llm = make_llm(speculative_config)
    batch = mixed_batch()
    if speculative_config["method"] == "replay":
        # The reference outputs, each token wrong with probability 0.3: wrong ones mostly break the grammar and are
        # cut when proposed.
        for output in reference:
            llm.engine.spec_decoder.replay.add_continuation(output.prompt_token_ids, output.outputs[0].token_ids)
    runs = 2 if speculative_config["method"] == "suffix" else 1  # the second run finds the first's outputs
    for _ in range(runs):
        got = generate(llm, batch)
    accepted_by_constrained = 0
    for (prompt, params), want, have in zip(batch, reference, got):
        assert len(have.outputs) == len(want.outputs) == params.n
        for a, b in zip(want.outputs, have.outputs):
            assert b.token_ids == a.token_ids, prompt
            assert (b.text, b.finish_reason) == (a.text, a.finish_reason), prompt
            if a.logprobs is not None:
                for entry_a, entry_b in zip(a.logprobs, b.logprobs, strict=True):
                    assert entry_a.keys() == entry_b.keys()
                    for token in entry_a:
                        assert entry_b[token].logprob == pytest.approx(entry_a[token].logprob, abs=1e-4)
        if params.structured_outputs is not None:
            length = have.metrics.spec_decode_acceptance_length if have.metrics is not None else None
            if params.disable_speculation:
                assert length is None, prompt
            elif length is not None and length > 1.0:
                accepted_by_constrained += 1
    # The draft model's unconstrained argmax rarely fits a grammar: fewer of its requests accept anything.
    assert accepted_by_constrained >= (1 if speculative_config is DRAFT_MODEL else 2), "no drafts accepted"
    json_output = json.loads(got[0].outputs[0].text)
    jsonschema.validate(json_output, ITEM)
    assert re.fullmatch(CODES, got[1].outputs[0].text) or got[1].outputs[0].finish_reason == "length"
    stats = llm.engine.get_stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert stats.num_free_blocks == stats.num_blocks
    llm.engine.kv_cache.check_invariants([])


def test_sampled_constrained_requests_speculate_and_stay_valid():
    llm = make_llm(NGRAM)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=36, structured_outputs=constrained(regex=CODES))
              for i in range(6)] + [SamplingParams(temperature=0.8, seed=9, max_tokens=40, top_p=0.9,
                                                   structured_outputs=constrained(json=ITEM))]
    prompts = ["AA-77 OC-77 HI-77 AA-77 OC-77"] * 6 + ['{"id":7,"ok":true} {"id":7,"ok":true} {"id":']
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for output in outputs[:6]:
        completion = output.outputs[0]
        assert completion.finish_reason == "length" or re.fullmatch(CODES, completion.text), completion.text
    if outputs[6].outputs[0].finish_reason == "stop":
        jsonschema.validate(json.loads(outputs[6].outputs[0].text), ITEM)
    assert llm.engine.get_stats().spec_decode.num_accepted_tokens > 0


# ---- the grammar's side, unit by unit ----

@pytest.fixture(scope="module")
def compiler():
    return structured.GrammarCompiler(transformers.AutoTokenizer.from_pretrained(tiny_model_dir()))


def encode(compiler, text: str) -> list[int]:
    return compiler.tokenizer.encode(text, add_special_tokens=False)


def masks_fed_one_by_one(compiler, params: StructuredOutputsParams, history: list[int], drafts: list[int]):
    """Row j: the mask of a fresh matcher fed history and drafts[:j]; rows from the first rejected draft on: None."""
    matcher = compiler.compile(params)
    assert matcher.consume_tokens(history) or not history
    rows = []
    for draft in drafts + [None]:
        rows.append(structured.fill_bitmask([matcher], compiler.ll_tokenizer.vocab_size)[0])
        if draft is None or not matcher.consume_token(draft):
            break
    return rows


def test_draft_bitmasks_equal_a_matcher_fed_the_drafts_and_leave_it_where_it_was(compiler):
    params = constrained(regex=CODES)
    state = compiler.new_state(params)
    history = encode(compiler, "AB-12 ")
    for token in history:
        state.advance(token)
    valid = encode(compiler, "CD-345 E")
    invalid = valid[:2] + encode(compiler, "x") + valid[2:]
    before = structured.fill_bitmask([state.matcher], state.vocab_size)
    for drafts in (valid, invalid, []):
        expected = masks_fed_one_by_one(compiler, params, history, drafts)
        for started in ("no fill", "fill for these drafts", "fill for other drafts"):
            if started == "fill for these drafts":
                structured.start_mask_fill([state], draft_token_ids=[drafts])
            elif started == "fill for other drafts":
                structured.start_mask_fill([state], draft_token_ids=[valid[:1]])
            got = structured.draft_bitmasks([state, state.__class__(compiler.compile(params), state.vocab_size)],
                                            [drafts, []])
            assert got.shape[0] == len(drafts) + 2
            for j, row in enumerate(expected):
                assert torch.equal(got[j], row), (started, j)
            assert torch.equal(got[len(drafts) + 1], masks_fed_one_by_one(compiler, params, [], [])[0])
            assert state.pending is None
            assert torch.equal(structured.fill_bitmask([state.matcher], state.vocab_size), before)
    assert len(masks_fed_one_by_one(compiler, params, history, invalid)) == 3  # the cut is at the "x"


def decoding_request(compiler, params: StructuredOutputsParams, prompt: list[int], output: list[int]) -> Request:
    request = Request("r", list(prompt), SamplingParams(max_tokens=50, structured_outputs=params),
                      compiler.tokenizer.eos_token_id, 256, grammar=compiler.new_state(params))
    for token in output:
        request.append_output_token(token)
        request.grammar.advance(token)
    request.num_computed_tokens = request.num_tokens - 1
    return request


def test_proposals_the_grammar_rejects_are_cut(compiler):
    params = constrained(regex=CODES)
    prompt = encode(compiler, "Codes:")
    output = encode(compiler, "AB-12 ")
    decoder = SpecDecoder(SpeculativeConfig("replay", 6, acceptance_rate=1.0), compiler.ll_tokenizer.vocab_size)
    valid = encode(compiler, "CD-345 E")
    rejected = encode(compiler, "x")
    decoder.replay.add_continuation(prompt, output + valid[:3] + rejected + valid[3:])
    request = decoding_request(compiler, params, prompt, output)
    plain = Request("p", list(prompt), SamplingParams(max_tokens=50), None, 256)
    for token in output:
        plain.append_output_token(token)
    plain.num_computed_tokens = plain.num_tokens - 1
    decoder.propose([request, plain])
    assert request.spec_token_ids == valid[:3]
    assert plain.spec_token_ids == valid[:3] + rejected + valid[3:5]  # no grammar: nothing cut
    # A grammar that is complete takes nothing but EOS: a proposal past its end is cut whole.
    done = decoding_request(compiler, constrained(choice=["yes", "no"]), prompt, encode(compiler, "no"))
    decoder.replay.add_continuation(prompt, encode(compiler, "no") + valid)
    decoder.propose([done])
    assert done.spec_token_ids == []


def test_verify_masks_each_row_with_the_grammar_after_the_drafts_before_it(compiler):
    """Greedy verification against a direct computation: each row's argmax among the tokens its mask allows, the
    raw argmax made a forbidden token; after the output processor's advance the matcher equals one fed only the
    kept tokens."""
    params = constrained(regex=CODES)
    history = encode(compiler, "AB-12 ")
    drafts = encode(compiler, "CD-345 E")[:4]
    request = decoding_request(compiler, params, encode(compiler, "Codes:"), history)
    vocab = compiler.ll_tokenizer.vocab_size
    masks = masks_fed_one_by_one(compiler, params, history, drafts)
    allowed = structured.allowed_mask(torch.stack(masks), vocab)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(len(drafts) + 1, vocab, generator=generator)
    logits[:, 0] = 100.0  # forbidden everywhere: only the mask keeps it from winning
    for j in range(2):  # the first two drafts are the target's choice among what the grammar allows
        logits[j, drafts[j]] = 50.0
    other = [t for t in allowed[2].nonzero().flatten().tolist() if t != drafts[2]][0]
    logits[2, other] = 50.0  # the third isn't
    expected = [int(torch.where(allowed[j], logits[j], float("-inf")).argmax()) for j in range(len(drafts) + 1)]
    assert expected[:2] == drafts[:2] and expected[2] != drafts[2]
    before = structured.fill_bitmask([request.grammar.matcher], vocab)
    (result,) = verify(logits.clone(), [request], [drafts])
    assert result.token_ids == expected[:3] and result.num_accepted == 2
    assert torch.equal(structured.fill_bitmask([request.grammar.matcher], vocab), before)
    for token in result.token_ids:
        assert request.grammar.advance(token)
    fed_accepted = compiler.compile(params)
    assert fed_accepted.consume_tokens(history + result.token_ids)
    assert torch.equal(structured.fill_bitmask([request.grammar.matcher], vocab),
                       structured.fill_bitmask([fed_accepted], vocab))


def test_matcher_after_partly_rejected_steps_holds_only_the_accepted_tokens(reference):
    """Replayed drafts, 30% wrong: after every step each constrained request's matcher gives the mask of a fresh
    matcher fed the request's output, and some steps accepted a part of their drafts."""
    llm = make_llm(REPLAY)
    engine = llm.engine
    for output in reference:
        engine.spec_decoder.replay.add_continuation(output.prompt_token_ids, output.outputs[0].token_ids)
    compiler = engine.grammar_compiler()
    for i, (prompt, params) in enumerate(mixed_batch()):
        engine.add_request(str(i), prompt, params)
    partly_rejected = 0
    while engine.has_unfinished_requests():
        engine.step()
        for request in engine.scheduler.running:
            if request.grammar is None:
                continue
            fresh = compiler.compile(request.sampling_params.structured_outputs)
            assert fresh.consume_tokens(request.output_token_ids) or not request.output_token_ids
            assert torch.equal(structured.fill_bitmask([request.grammar.matcher], request.grammar.vocab_size),
                               structured.fill_bitmask([fresh], request.grammar.vocab_size)), request.request_id
            assert request.grammar.num_consumed == request.num_output_tokens
            partly_rejected += (0 < request.num_spec_accepted_tokens < request.num_spec_draft_tokens)
    assert partly_rejected > 0


# ---- distribution ----

SHARP_CODE = r"[a-d]{2}"


@pytest.fixture(scope="module")
def sharp_model(tmp_path_factory):
    """A 2-layer Llama on SmolLM2's vocabulary with large random weights (a peaked next-token distribution)."""
    path = tmp_path_factory.mktemp("sharp")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir())
    tokenizer.save_pretrained(path)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return str(path), model, tokenizer


def test_sampling_at_temperature_one_follows_the_masked_target(sharp_model):
    """1500 requests constrained to two letters of a-d: the first token is sampled, the second verified
    against a replayed draft (the likely letter). The outputs must follow p(t1 | prompt) · p(t2 | prompt, t1), each
    factor transformers' distribution renormalized over what the grammar allows there (a two-letter first token
    completes the output alone)."""
    path, hf_model, tokenizer = sharp_model
    params = constrained(regex=SHARP_CODE)
    compiler = structured.GrammarCompiler(tokenizer)
    vocab = compiler.ll_tokenizer.vocab_size
    prompt = tokenizer.encode("Two letters:", add_special_tokens=False)

    def allowed_after(tokens: list[int]) -> torch.Tensor:
        matcher = compiler.compile(params)
        assert matcher.consume_tokens(tokens) or not tokens
        mask = structured.allowed_mask(structured.fill_bitmask([matcher], vocab), vocab)[0]
        return torch.nn.functional.pad(mask, (0, hf_model.config.vocab_size - vocab))

    first_allowed = allowed_after([])
    first_tokens = first_allowed.nonzero().flatten().tolist()
    single = [t for t in first_tokens if len(tokenizer.decode([t])) == 1]
    assert len(single) == 4 and len(first_tokens) > 8
    with torch.no_grad():
        first_logits = hf_model(torch.tensor([prompt])).logits[0, -1]
        second_logits = hf_model(torch.tensor([prompt + [t] for t in single])).logits[:, -1]
    masked_first = first_logits.masked_fill(~first_allowed, float("-inf"))
    likely_first = single[int(masked_first[single].argmax())]
    second_allowed = {t: allowed_after([t]) for t in single}
    masked_second = {t: second_logits[i].masked_fill(~second_allowed[t], float("-inf")) for i, t in enumerate(single)}
    likely_second = int(masked_second[likely_first].argmax())
    num_samples = 1500
    p1 = reference_probs(masked_first)
    expected = {}
    for a in first_tokens:
        if a in single:
            p2 = reference_probs(masked_second[a])
            expected.update({(a, b): float(p1[a] * p2[b]) for b in p2.nonzero().flatten().tolist()})
        else:
            expected[(a,)] = float(p1[a])
    llm = LLM(model=path, max_model_len=64, seed=0, max_num_seqs=256, speculative_config={
        "method": "replay", "num_speculative_tokens": 2, "acceptance_rate": 1.0})
    llm.engine.spec_decoder.replay.add_continuation(prompt, [likely_first, likely_second, 0])
    # Unseeded: the rows share the engine's generator (seeded by LLM(seed=0)) in one batched draw per step.
    outputs = llm.generate([{"prompt_token_ids": prompt}] * num_samples,
                           SamplingParams(temperature=1.0, max_tokens=3, structured_outputs=params), use_tqdm=False)
    observed = Counter(tuple(output.outputs[0].token_ids) for output in outputs)
    assert chi_square_p_value(observed, expected, num_samples) > SIGNIFICANCE
    spec = llm.engine.get_stats().spec_decode
    assert spec.num_drafts >= num_samples // 10 and spec.num_accepted_tokens > 0, spec
