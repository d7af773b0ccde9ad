"""The replay proposer, for benchmarks only: it proposes the continuation a non-speculative run produced, each
token replaced by a wrong one with probability 1 - acceptance_rate, so the verify step's cost can be measured at a
chosen acceptance on dummy weights (whose own proposals would almost never be accepted)."""
from __future__ import annotations

import random


class ReplayProposer:
    def __init__(self, acceptance_rate: float, vocab_size: int, seed: int = 0) -> None:
        self.acceptance_rate = acceptance_rate
        self.vocab_size = vocab_size
        self.rng = random.Random(seed)
        self.continuations: dict[tuple[int, ...], list[int]] = {}  # prompt token ids -> the reference output

    def add_continuation(self, prompt_token_ids: list[int], output_token_ids: list[int]) -> None:
        self.continuations[tuple(prompt_token_ids)] = list(output_token_ids)

    def propose(self, prompt_token_ids: list[int], output_token_ids: list[int], num_tokens: int) -> list[int]:
        reference = self.continuations.get(tuple(prompt_token_ids))
        if reference is None:
            return []
        start = len(output_token_ids)
        return [token if self.rng.random() < self.acceptance_rate else (token + 1) % self.vocab_size
                for token in reference[start:start + num_tokens]]
