"""The rejection sampler against a direct computation of what it must emit, and chi-square tests that the emitted
tokens follow the target's own distribution (temperature, top-k, top-p, min-p; point-mass and sampled drafts)."""
from collections import Counter

import pytest
import torch

from serval.engine.request import Request
from serval.engine.spec_decode.rejection_sampler import verify
from serval.sampling_params import SamplingParams
from tests.engine.spec_decode.stats import SIGNIFICANCE, chi_square_p_value, reference_probs

VOCAB = 6
NUM_SAMPLES = 30000


def make_requests(count: int, **params) -> list[Request]:
    return [Request(f"r{i}", [1], SamplingParams(**params), None, 64) for i in range(count)]


def row_logits(num_rows: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, VOCAB, generator=generator) * 1.5


def test_greedy_keeps_the_drafts_equal_to_the_argmax_then_the_argmax():
    logits = row_logits(4, seed=0)
    target = logits.argmax(dim=-1).tolist()
    wrong = (target[1] + 1) % VOCAB
    results = verify(torch.cat([logits, logits]), make_requests(2, temperature=0.0),
                     [target[:3], [target[0], wrong, target[2]]])
    assert results[0].token_ids == target and results[0].num_accepted == 3
    assert results[1].token_ids == target[:2] and results[1].num_accepted == 1
    # logit_bias applies to every verified row, as to a plain step.
    biased = verify(logits.clone(), make_requests(1, temperature=0.0, logit_bias={wrong: 100.0}), [[wrong] * 3])
    assert biased[0].token_ids == [wrong] * 4


def test_logprobs_are_the_target_raw_logprobs_of_each_emitted_token():
    logits = row_logits(3, seed=1)
    target = logits.argmax(dim=-1).tolist()
    result = verify(logits.clone(), make_requests(1, temperature=0.0, logprobs=2), [target[:2]])[0]
    reference = torch.log_softmax(logits, dim=-1)
    assert len(result.logprobs) == 3
    for row, (token, entry) in enumerate(zip(result.token_ids, result.logprobs)):
        assert entry[token].logprob == pytest.approx(reference[row, token].item(), abs=1e-5)
        assert entry[token].rank == 1


def emitted_sequence_probs(p: torch.Tensor, drafts: list[int]) -> dict[tuple, float]:
    """Direct computation: with point-mass drafts, a sequence that accepts j drafts then emits y has probability
    p_0(d_0) ... p_{j-1}(d_{j-1}) · p_j(y) (y ≠ d_j unless every draft was accepted): the target's own."""
    probs, prefix = {}, 1.0
    for j in range(len(drafts) + 1):
        for y in range(VOCAB):
            if j < len(drafts) and y == drafts[j]:
                continue
            probs[tuple(drafts[:j]) + (y,)] = prefix * float(p[j, y])
        if j < len(drafts):
            prefix *= float(p[j, drafts[j]])
    return probs


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.7, top_p=0.8),
                                    dict(temperature=1.3, top_k=3), dict(temperature=1.0, min_p=0.15)],
                         ids=["t1", "top_p", "top_k", "min_p"])
def test_point_mass_drafts_emit_the_target_distribution(params):
    logits = row_logits(3, seed=2)
    p = torch.stack([reference_probs(row, **params) for row in logits])
    drafts = [int(p[0].argmax()), int(p[1].argsort()[-2])]  # a likely first draft, a less likely second
    expected = emitted_sequence_probs(p, drafts)
    assert sum(expected.values()) == pytest.approx(1.0)
    results = verify(logits.repeat(NUM_SAMPLES, 1), make_requests(NUM_SAMPLES, **params), [drafts] * NUM_SAMPLES)
    observed = Counter(tuple(result.token_ids) for result in results)
    assert chi_square_p_value(observed, expected, NUM_SAMPLES) > SIGNIFICANCE


def test_sampled_drafts_with_their_distribution_emit_the_target_first_token():
    logits = row_logits(2, seed=3)
    p0 = reference_probs(logits[0])
    q = torch.softmax(row_logits(1, seed=4)[0], dim=-1)  # a different draft distribution
    drafts = torch.multinomial(q, NUM_SAMPLES, replacement=True, generator=torch.Generator().manual_seed(5)).tolist()
    results = verify(logits.repeat(NUM_SAMPLES, 1), make_requests(NUM_SAMPLES, temperature=1.0),
                     [[d] for d in drafts], draft_probs=q.repeat(NUM_SAMPLES, 1))
    observed = Counter(result.token_ids[0] for result in results)
    assert chi_square_p_value(observed, {y: float(p0[y]) for y in range(VOCAB)}, NUM_SAMPLES) > SIGNIFICANCE
    # And acceptance is what the theory says: sum_x min(p(x), q(x)).
    accepted = sum(result.num_accepted for result in results) / NUM_SAMPLES
    assert accepted == pytest.approx(float(torch.minimum(p0, q).sum()), abs=0.02)


def test_a_wrong_sampler_would_fail():
    """The test's power: always accepting the drafts is caught."""
    logits = row_logits(3, seed=2)
    p = torch.stack([reference_probs(row) for row in logits])
    drafts = [int(p[0].argmax()), int(p[1].argsort()[-2])]
    expected = emitted_sequence_probs(p, drafts)
    observed = Counter({tuple(drafts) + (int(p[2].argmax()),): NUM_SAMPLES})
    assert chi_square_p_value(observed, expected, NUM_SAMPLES) < SIGNIFICANCE


def test_seeded_requests_repeat_and_do_not_depend_on_the_batch():
    logits = row_logits(3, seed=6)
    drafts = [int(logits[0].argmax()), int(logits[1].argmax())]

    def run(batch_size: int) -> list[list[int]]:
        requests = make_requests(batch_size, temperature=1.0, seed=7)
        for request in requests:
            request.generator = torch.Generator().manual_seed(7)
        return [r.token_ids for r in verify(logits.repeat(batch_size, 1), requests, [drafts] * batch_size)]

    assert run(1)[0] == run(3)[2]


def test_greedy_and_sampled_requests_in_one_batch_each_keep_their_own_tokens():
    """Greedy rows beside sampled ones, whose acceptance, fallback draws and argmax come back in one read: the
    greedy request keeps what it keeps alone, the seeded sampled one what it draws alone."""
    logits = row_logits(4, seed=3)
    target = logits.argmax(dim=-1).tolist()
    drafts = [target[0], target[1], (target[2] + 1) % VOCAB]

    def sampled() -> list[Request]:
        requests = make_requests(1, temperature=1.0, seed=5)
        requests[0].generator = torch.Generator().manual_seed(5)
        return requests

    alone = verify(logits.clone(), sampled(), [drafts])[0].token_ids
    mixed = verify(torch.cat([logits, logits]), make_requests(1, temperature=0.0) + sampled(), [drafts, drafts])
    assert [result.token_ids for result in mixed] == [target[:3], alone]
    assert alone != target[:3]  # the sampled request does draw: the two rules are told apart
