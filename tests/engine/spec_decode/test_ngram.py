"""Prompt lookup proposals against transformers' PromptLookupCandidateGenerator on the same token sequences."""
import random

import torch
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

from serval.engine.spec_decode.ngram import propose_ngram


def transformers_candidates(token_ids: list[int], num_tokens: int, max_ngram: int) -> list[int]:
    generator = PromptLookupCandidateGenerator(num_output_tokens=num_tokens, max_matching_ngram_size=max_ngram,
                                               max_length=len(token_ids) + num_tokens + 1)
    candidates, _ = generator.get_candidates(torch.tensor([token_ids]))
    return candidates[0, len(token_ids):].tolist()


def test_matches_transformers_on_random_sequences():
    rng = random.Random(0)
    num_nonempty = 0
    for _ in range(300):
        vocab = rng.choice([3, 6, 20])
        token_ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        num_tokens, max_ngram = rng.randrange(1, 6), rng.randrange(1, 5)
        ours = propose_ngram(token_ids, num_tokens, 1, max_ngram)
        assert ours == transformers_candidates(token_ids, num_tokens, max_ngram), (token_ids, num_tokens, max_ngram)
        num_nonempty += bool(ours)
    assert num_nonempty > 100


def test_min_ngram_and_no_match():
    assert propose_ngram([5, 6, 7, 8, 9, 5], 3, 1, 2) == [6, 7, 8]
    assert propose_ngram([5, 6, 7, 8, 9, 5], 3, 2, 2) == []  # (9, 5) never occurred before
    assert propose_ngram([1, 2, 3, 1, 2], 5, 1, 3) == [3, 1, 2]  # the continuation stops at the end of the tokens
    assert propose_ngram([4], 3, 1, 3) == []
