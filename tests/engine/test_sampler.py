"""Sampler: each processing step against a direct per-row torch computation; draws against the softmax."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from serval.engine.request import Request
from serval.engine.sampler import (
    SamplerOutput, _apply_penalties, apply_history_processing, apply_top_k_top_p, compute_prompt_logprobs, sample)
from serval.sampling_params import SamplingParams

_ids = itertools.count()


def make_request(prompt: list[int] | None = None, output: list[int] | None = None, eos: int | None = 2,
                 seed: int | None = None, **params) -> Request:
    request = Request(request_id=f"r{next(_ids)}", prompt_token_ids=list(prompt or [5, 6, 7]),
                      sampling_params=SamplingParams(seed=seed, **params), eos_token_id=eos, max_model_len=4096)
    for token in output or []:
        request.append_output_token(token)
    if seed is not None:
        request.generator = torch.Generator().manual_seed(seed)
    return request


def random_logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_greedy_is_argmax_of_processed_logits():
    logits = random_logits(6, 500)
    requests = [make_request(temperature=0.0) for _ in range(6)]
    out = sample(logits.clone(), requests)
    assert isinstance(out, SamplerOutput)
    assert out.sampled_token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 6
    # Greedy rows mixed with random ones keep their argmax.
    mixed = [make_request(temperature=0.0), make_request(temperature=1.0), make_request(temperature=0.0)]
    out = sample(logits[:3].clone(), mixed)
    assert out.sampled_token_ids[0] == logits[0].argmax() and out.sampled_token_ids[2] == logits[2].argmax()


def test_penalties_match_per_row_reference():
    vocab = 64
    generator = torch.Generator().manual_seed(1)
    cases = [dict(repetition_penalty=1.3), dict(frequency_penalty=0.7), dict(presence_penalty=-0.5),
             dict(repetition_penalty=0.8, frequency_penalty=-0.4, presence_penalty=1.5), dict()]
    requests = []
    for case in cases:
        prompt = torch.randint(0, vocab, (12,), generator=generator).tolist()
        output = torch.randint(0, 16, (20,), generator=generator).tolist()  # small range: repeats
        requests.append(make_request(prompt=prompt, output=output, **case))
    logits = random_logits(len(cases), vocab, seed=2)
    processed = logits.clone()
    _apply_penalties(processed, requests)
    for row, request in enumerate(requests):
        p = request.sampling_params
        expected = logits[row].clone()
        for token in set(request.all_token_ids):
            value = expected[token]
            expected[token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
        for token in set(request.output_token_ids):
            count = request.output_token_ids.count(token)
            expected[token] -= p.frequency_penalty * count + p.presence_penalty
        torch.testing.assert_close(processed[row], expected)
    # The greedy token is the argmax of the penalized logits.
    greedy = [make_request(prompt=r.prompt_token_ids, output=r.output_token_ids, temperature=0.0,
                           **{k: getattr(r.sampling_params, k) for k in
                              ("repetition_penalty", "frequency_penalty", "presence_penalty")}) for r in requests]
    assert sample(logits.clone(), greedy).sampled_token_ids == processed.argmax(-1).tolist()


def reference_keep(logits: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """Sort-based reference: the top_k most likely, then the smallest prefix whose renormalized mass >= top_p."""
    order = logits.argsort(descending=True).tolist()
    kept = order[:top_k] if top_k > 0 else order
    probs = torch.softmax(logits[kept], dim=-1)
    cumulative = probs.cumsum(0)
    count = int((cumulative < top_p).sum()) + 1
    return set(kept[:min(count, len(kept))])


def midpoint_top_p(logits: torch.Tensor, top_k: int, keep: int) -> float:
    """A top_p halfway between two cumulative masses, so float rounding can't move the boundary."""
    values = logits.sort(descending=True).values[:top_k if top_k > 0 else None]
    cumulative = torch.softmax(values, dim=-1).cumsum(0)
    return float((cumulative[keep - 2] + cumulative[keep - 1]) / 2)


def test_top_k_top_p_mask_matches_sorted_reference():
    vocab = 200
    logits = random_logits(6, vocab, seed=3)
    settings = [(5, 1.0), (0, None), (40, None), (1, 1.0), (vocab, None), (7, None)]
    keeps = [None, 10, 6, None, 3, 4]
    top_k, top_p = [], []
    for row, ((k, p), keep) in enumerate(zip(settings, keeps)):
        top_k.append(k if k > 0 else vocab)
        top_p.append(p if p is not None else midpoint_top_p(logits[row], k, keep))
    masked = apply_top_k_top_p(logits.clone(), torch.tensor(top_k), torch.tensor(top_p))
    only_k = apply_top_k_top_p(logits.clone(), torch.tensor(top_k), None)
    for row in range(len(settings)):
        kept = set(torch.nonzero(masked[row] > float("-inf")).flatten().tolist())
        assert kept == reference_keep(logits[row], top_k[row], top_p[row]), row
        torch.testing.assert_close(masked[row][list(kept)], logits[row][list(kept)])
        kept_k = set(torch.nonzero(only_k[row] > float("-inf")).flatten().tolist())
        assert kept_k == set(logits[row].argsort(descending=True)[:top_k[row]].tolist())
    # A tiny top_p keeps the most likely token alone.
    tiny = apply_top_k_top_p(logits.clone(), None, torch.full((6,), 1e-6))
    assert ((tiny > float("-inf")).sum(-1) == 1).all()
    assert torch.equal(tiny.argmax(-1), logits.argmax(-1))


def sampled_support(logits_row: torch.Tensor, num_draws: int, **params) -> tuple[set[int], torch.Tensor]:
    """Draw num_draws tokens in one batch of identical unseeded requests; return the tokens seen and counts."""
    requests = [make_request(**params) for _ in range(num_draws)]
    tokens = sample(logits_row.expand(num_draws, -1).clone(), requests).sampled_token_ids
    return set(tokens), torch.bincount(torch.tensor(tokens), minlength=logits_row.shape[0]).float()


@pytest.mark.parametrize("params", [
    dict(temperature=0.8, top_k=4),
    dict(temperature=1.3, top_p=None),
    dict(temperature=0.7, min_p=0.05),
    dict(temperature=1.0, top_k=8, top_p=None, min_p=0.02),
])
def test_sampled_support_matches_reference(params):
    params = dict(params)
    torch.manual_seed(0)
    vocab = 30
    logits = random_logits(1, vocab, seed=4, scale=1.5)[0]
    scaled = logits / params["temperature"]
    probs = torch.softmax(scaled, dim=-1)
    keep = set(range(vocab))
    if params.get("min_p"):
        keep = {t for t in keep if probs[t] >= params["min_p"] * probs.max()}
    survivors = scaled.clone()
    survivors[[t for t in range(vocab) if t not in keep]] = float("-inf")
    top_k = params.get("top_k", 0)
    if "top_p" in params:
        params["top_p"] = midpoint_top_p(survivors, top_k, keep=3)
    keep = reference_keep(survivors, top_k, params.get("top_p", 1.0)) & keep
    seen, counts = sampled_support(logits, 6000, **params)
    assert seen == keep
    # The kept tokens are drawn in proportion to their renormalized probabilities.
    kept = sorted(keep)
    assert chi_square(counts[kept], torch.softmax(scaled[kept], dim=-1)) < 40.0


def test_unconstrained_frequencies_match_softmax():
    torch.manual_seed(5)
    logits = random_logits(1, 12, seed=6, scale=1.0)[0]
    _, counts = sampled_support(logits, 20000, temperature=0.7)
    # 11 degrees of freedom: P(chi2 > 40) < 1e-4, and the seed is fixed.
    assert chi_square(counts, torch.softmax(logits / 0.7, dim=-1)) < 40.0


def test_seeded_rows_draw_from_their_own_generators_with_the_right_frequencies():
    logits = random_logits(1, 10, seed=7, scale=1.0)[0]
    num_rows = 4000
    requests = [make_request(seed=seed) for seed in range(num_rows)]
    tokens = sample(logits.expand(num_rows, -1).clone(), requests).sampled_token_ids
    counts = torch.bincount(torch.tensor(tokens), minlength=10).float()
    assert chi_square(counts, torch.softmax(logits, dim=-1)) < 40.0


def test_seed_gives_same_tokens_whatever_the_batch():
    vocab, steps = 1000, 12
    logits = random_logits(steps, vocab, seed=8, scale=0.5)  # flat: draws differ from argmax

    def run(seed: int, position: int, neighbours: list[dict]) -> list[int]:
        target = make_request(seed=seed, temperature=0.9, top_p=0.95)
        others = [make_request(**n) for n in neighbours]
        batch = others[:position] + [target] + others[position:]
        out = []
        for step in range(steps):
            rows = torch.stack([logits[step] if r is target else logits[(step + i + 1) % steps]
                                for i, r in enumerate(batch)])
            out.append(sample(rows, batch).sampled_token_ids[batch.index(target)])
        return out

    alone = run(42, 0, [])
    assert run(42, 1, [dict(seed=3), dict(temperature=0.0)]) == alone
    assert run(42, 2, [dict(), dict(temperature=0.5, top_k=5), dict(seed=42)]) == alone
    assert run(43, 0, [dict()]) != alone


def test_unseeded_rows_vary():
    torch.manual_seed(9)
    logits = random_logits(1, 1000, seed=10, scale=0.5)
    first = [sample(logits.clone(), [make_request()]).sampled_token_ids[0] for _ in range(10)]
    assert len(set(first)) > 1
    # Two unseeded rows in one batch are independent draws.
    pair = [sample(logits.expand(2, -1).clone(), [make_request(), make_request()]).sampled_token_ids
            for _ in range(10)]
    assert any(a != b for a, b in pair)


def test_logit_bias_forces_and_forbids_tokens():
    logits = random_logits(3, 100, seed=11)
    favourite = int(logits[0].argmin())
    requests = [make_request(logit_bias={favourite: 100.0}),
                make_request(temperature=0.0, logit_bias={int(logits[1].argmax()): -100.0}),
                make_request(temperature=0.0, logit_bias={3: 0.5, 4: -0.25})]
    out = sample(logits.clone(), requests).sampled_token_ids
    assert out[0] == favourite
    assert out[1] == int(logits[1].topk(2).indices[1])
    biased = logits[2].clone()
    biased[3] += 0.5
    biased[4] -= 0.25
    assert out[2] == int(biased.argmax())


def test_min_tokens_blocks_eos_and_stop_ids():
    vocab, eos = 50, 2
    logits = torch.zeros(4, vocab)
    logits[:, eos] = 20.0
    logits[:, 9] = 19.0  # a stop token id
    logits[:, 11] = 18.0
    blocked = make_request(eos=eos, output=[4, 5], temperature=0.0, min_tokens=3, stop_token_ids=[9])
    done = make_request(eos=eos, output=[4, 5, 6], temperature=0.0, min_tokens=3, stop_token_ids=[9])
    ignoring = make_request(eos=eos, output=[4], temperature=0.0, min_tokens=3, stop_token_ids=[9], ignore_eos=True)
    sampled = make_request(eos=eos, output=[], min_tokens=2, stop_token_ids=[9])
    out = sample(logits.clone(), [blocked, done, ignoring, sampled]).sampled_token_ids
    # With EOS ignored it ends nothing, so min_tokens leaves it alone (as vLLM does).
    assert out[:3] == [11, eos, eos]
    assert out[3] not in (eos, 9)


def test_allowed_token_ids_restrict_greedy_sampling():
    logits = random_logits(4, 200, seed=21)
    allowed = [3, 50, 51, 199]
    assert all(int(row.argmax()) not in allowed for row in logits)  # the mask decides every row below
    requests = [make_request(temperature=0.0, allowed_token_ids=allowed),
                make_request(temperature=0.0),
                make_request(temperature=0.0, allowed_token_ids=[7]),
                make_request(temperature=0.0, allowed_token_ids=allowed, logit_bias={int(logits[3].argmax()): 100.0},
                             repetition_penalty=0.5, output=[int(logits[3].argmax())])]
    out = sample(logits.clone(), requests).sampled_token_ids
    assert out[0] == max(allowed, key=lambda token: float(logits[0, token]))
    assert out[1] == int(logits[1].argmax())  # a row without the field is its own
    assert out[2] == 7
    # Nothing lifts a disallowed token back: neither a bias nor a penalty below 1 (which raises seen tokens).
    assert out[3] == max(allowed, key=lambda token: float(logits[3, token]))


def test_allowed_token_ids_restrict_random_sampling_to_the_renormalized_softmax():
    torch.manual_seed(23)
    logits = random_logits(1, 40, seed=24, scale=1.0)[0]
    allowed = [0, 5, 6, 17, 39]
    seen, counts = sampled_support(logits, 8000, temperature=0.9, allowed_token_ids=allowed)
    assert seen == set(allowed)
    # 4 degrees of freedom: P(chi2 > 30) < 1e-5, and the seed is fixed.
    assert chi_square(counts[allowed], torch.softmax(logits[allowed] / 0.9, dim=-1)) < 30.0
    seen, _ = sampled_support(logits, 500, temperature=1.0, top_k=2, allowed_token_ids=allowed)
    assert seen <= set(allowed) and len(seen) == 2  # top_k counts among the allowed tokens
    seeded = [make_request(seed=seed, allowed_token_ids=[11, 12]) for seed in range(200)]
    assert set(sample(logits.expand(200, -1).clone(), seeded).sampled_token_ids) == {11, 12}


def banned(requests: list[Request], vocab: int = 64) -> list[set[int]]:
    """The tokens apply_history_processing sets to -inf, per request, on flat logits."""
    logits = torch.zeros(len(requests), vocab)
    apply_history_processing(logits, requests)
    return [set(torch.isneginf(row).nonzero().flatten().tolist()) for row in logits]


def test_a_one_token_bad_word_is_banned_at_every_step():
    words = [[9], [20]]
    assert banned([make_request(output=[], bad_words_token_ids=words),
                   make_request(output=[9, 4], bad_words_token_ids=words),
                   make_request(output=[1, 2, 3])]) == [{9, 20}, {9, 20}, set()]


def test_a_longer_bad_words_last_token_is_banned_only_after_the_rest_was_generated():
    word = [11, 12, 13]
    cases = {
        (): set(),  # too short to hold the prefix (vLLM: the word is longer than output + 1)
        (12,): set(),  # only part of the prefix
        (11, 12): {13},
        (5, 11, 12): {13},
        (11, 12, 7): set(),  # the prefix must be the last tokens generated
        (12, 12): set(),  # the last token alone does not make the prefix
        (11, 12, 13, 11, 12): {13},  # a word generated before (given directly, say) is banned again
    }
    requests = [make_request(output=list(output), bad_words_token_ids=[word]) for output in cases]
    assert banned(requests) == list(cases.values())


def test_bad_word_prefixes_count_generated_tokens_only():
    """As in vLLM: a word the prompt began may be finished (the prompt's tokens are not the model's)."""
    word = [30, 31]
    assert banned([make_request(prompt=[1, 30], output=[], bad_words_token_ids=[word]),
                   make_request(prompt=[1, 30], output=[30], bad_words_token_ids=[word])]) == [set(), {31}]


@pytest.mark.parametrize("lengths", [(1,), (1, 3), (2, 2)], ids=["one", "one-and-three", "two-and-two"])
def test_bad_words_in_a_batch_match_a_per_row_reference(lengths):
    """vLLM's published cases (tests/v1/sample/test_sampler.py::test_sampler_bad_words): random words of these
    lengths per request, one request without any, outputs that end in a word's prefix or in no prefix at all;
    every word sharing the matched prefix has its last token banned."""
    rng = random.Random(len(lengths) * 10 + sum(lengths))
    vocab = 64
    for _ in range(30):
        requests, expected = [], []
        for index in range(8):
            output = [rng.randrange(vocab) for _ in range(6)]
            if index == 3:
                requests.append(make_request(output=output))
                expected.append(set())
                continue
            words = [[rng.randrange(vocab) for _ in range(length)] for length in lengths]
            longer = [word for word in words if len(word) > 1]
            if longer and rng.random() < 0.6:
                chosen = rng.choice(longer)
                output[len(output) - len(chosen) + 1:] = chosen[:-1]
            else:  # a last token that begins no word, so that no prefix matches by chance
                output[-1] = rng.choice([t for t in range(vocab) if t not in {w[0] for w in words}])
            expected.append({word[-1] for word in words
                             if len(word) == 1 or output[len(output) - len(word) + 1:] == word[:-1]})
            requests.append(make_request(output=output, bad_words_token_ids=words))
        assert banned(requests, vocab) == expected


def test_greedy_sampling_steps_around_a_bad_word():
    logits = torch.zeros(3, 50)
    logits[:, 7] = 5.0
    logits[:, 8] = 4.0
    logits[:, 9] = 3.0
    words = [[7, 7], [3, 8]]
    out = sample(logits.clone(), [make_request(temperature=0.0, output=[1], bad_words_token_ids=words),
                                  make_request(temperature=0.0, output=[7], bad_words_token_ids=words),
                                  make_request(temperature=0.0, output=[3, 7], bad_words_token_ids=words +
                                               [[7, 8]])]).sampled_token_ids
    assert out == [7, 8, 9]


def test_logprobs_are_raw_with_ranks():
    logits = random_logits(4, 300, seed=12)
    requests = [make_request(logprobs=3, logit_bias={7: 50.0}, repetition_penalty=1.5),
                make_request(logprobs=0, temperature=0.0),
                make_request(),
                make_request(logprobs=5, temperature=0.0)]
    out = sample(logits.clone(), requests)
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[2] is None
    assert out.sampled_token_ids[0] == 7
    for row, k in ((0, 3), (1, 0), (3, 5)):
        entry = out.logprobs[row]
        token = out.sampled_token_ids[row]
        top = raw[row].topk(k)
        assert set(entry) == {token} | set(top.indices.tolist())
        assert entry[token].rank == 1 + int((raw[row] > raw[row, token]).sum())
        for rank, (value, token_id) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
            assert entry[token_id].rank == rank
            assert entry[token_id].logprob == pytest.approx(value, abs=1e-5)
        assert entry[token].logprob == pytest.approx(float(raw[row, token]), abs=1e-5)
        assert all(lp.decoded_token is None for lp in entry.values())
    assert out.logprobs[0][7].rank > 1  # ranked among the raw logits, before the bias


def test_prompt_logprobs():
    logits = random_logits(5, 120, seed=13)
    targets = torch.tensor([3, 50, 119, 0, int(logits[4].argmax())])
    raw = torch.log_softmax(logits, dim=-1)
    entries = compute_prompt_logprobs(logits, targets, num_top=2)
    assert len(entries) == 5
    for row, entry in enumerate(entries):
        target = int(targets[row])
        assert entry[target].logprob == pytest.approx(float(raw[row, target]), abs=1e-5)
        assert entry[target].rank == 1 + int((raw[row] > raw[row, target]).sum())
        top = raw[row].topk(2).indices.tolist()
        assert set(entry) == {target, *top}
        assert [entry[t].rank for t in top] == [1, 2]
    assert entries[4][int(targets[4])].rank == 1
    assert set(compute_prompt_logprobs(logits, targets, num_top=0)[1]) == {50}


def test_bfloat16_logits_and_mixed_batch():
    logits = random_logits(5, 256, seed=14).to(torch.bfloat16)
    requests = [make_request(temperature=0.0), make_request(seed=1, top_k=10, top_p=0.9, min_p=0.1),
                make_request(presence_penalty=1.0, output=[1, 2, 3]), make_request(logprobs=2, top_k=-1),
                make_request(temperature=2.0, top_p=0.5)]
    out = sample(logits, requests)
    assert len(out.sampled_token_ids) == 5 and all(0 <= t < 256 for t in out.sampled_token_ids)
    assert out.sampled_token_ids[0] == int(logits[0].float().argmax())
    assert out.sampled_token_ids[1] in set(logits[1].float().topk(10).indices.tolist())
