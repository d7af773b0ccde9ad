"""Suffix proposals: the longest match of the request's recent tokens in its own history or in recent finished
requests, for traffic that repeats itself (agents re-sending a file, code edits that quote the code they change).

The index is bounded: it keeps the last max_cached_requests finished sequences, and each token id maps to where
it occurs in them. A proposal follows the occurrence whose preceding tokens match the request's longest suffix
(up to max_depth tokens), preferring the request's own history, then the newest cached sequence.
"""
from __future__ import annotations

from collections import OrderedDict, defaultdict
from dataclasses import dataclass

# Occurrences of one token examined per proposal, newest first: a common token (a space, a newline) would otherwise
# make every proposal scan the whole index.
MAX_CANDIDATES = 256


@dataclass
class SuffixMatch:
    length: int  # matched suffix tokens
    continuation: list[int]


class SuffixIndex:
    def __init__(self, max_cached_requests: int, max_depth: int) -> None:
        self.max_cached_requests = max_cached_requests
        self.max_depth = max_depth
        self.sequences: OrderedDict[int, list[int]] = OrderedDict()  # oldest first
        self.occurrences: dict[int, list[tuple[int, int]]] = defaultdict(list)  # token -> (sequence id, position)
        self._next_id = 0

    def add(self, token_ids: list[int]) -> None:
        """Remember a finished sequence (prompt and output); the oldest is forgotten beyond the bound."""
        if len(token_ids) < 2:
            return
        sequence_id, self._next_id = self._next_id, self._next_id + 1
        self.sequences[sequence_id] = list(token_ids)
        for position, token in enumerate(token_ids):
            self.occurrences[token].append((sequence_id, position))
        while len(self.sequences) > self.max_cached_requests:
            old_id, old_tokens = self.sequences.popitem(last=False)
            for token in set(old_tokens):
                kept = [entry for entry in self.occurrences[token] if entry[0] != old_id]
                if kept:
                    self.occurrences[token] = kept
                else:
                    del self.occurrences[token]

    def propose(self, token_ids: list[int], num_tokens: int) -> list[int]:
        own = _best_match(token_ids, [(token_ids, p) for p in range(len(token_ids) - 1)
                                      if token_ids[p] == token_ids[-1]][-MAX_CANDIDATES:], self.max_depth, num_tokens)
        if own.length >= self.max_depth:
            return own.continuation
        candidates = [(self.sequences[sequence_id], position)
                      for sequence_id, position in self.occurrences.get(token_ids[-1], [])[-MAX_CANDIDATES:]]
        cached = _best_match(token_ids, candidates, self.max_depth, num_tokens)
        return cached.continuation if cached.length > own.length else own.continuation


def _best_match(token_ids: list[int], candidates: list[tuple[list[int], int]], max_depth: int,
                num_tokens: int) -> SuffixMatch:
    """Among occurrences (sequence, position) of the request's last token, the one whose preceding tokens match
    the request's suffix longest (the latest of equals), with its continuation."""
    best = SuffixMatch(0, [])
    for sequence, position in reversed(candidates):
        if position + 1 >= len(sequence):
            continue
        length = 1
        while (length < max_depth and length <= position and length < len(token_ids)
               and sequence[position - length] == token_ids[-1 - length]):
            length += 1
        if length > best.length:
            best = SuffixMatch(length, sequence[position + 1:position + 1 + num_tokens])
    return best
