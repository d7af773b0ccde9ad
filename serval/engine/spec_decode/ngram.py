"""Prompt lookup (n-gram) proposals: the tokens that followed the last earlier occurrence of the request's own
most recent tokens (Saxena's prompt lookup decoding; transformers' `prompt_lookup_num_tokens`).

Longer suffixes are tried first; among the occurrences of one length the earliest with a continuation wins, as in
transformers, so both engines propose the same tokens (greedy outputs don't depend on that, acceptance does).
"""
from __future__ import annotations


def propose_ngram(token_ids: list[int], num_tokens: int, min_ngram: int, max_ngram: int) -> list[int]:
    """Up to num_tokens proposed continuations of token_ids; [] when no suffix of min_ngram..max_ngram tokens
    occurred before."""
    length = len(token_ids)
    for size in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        suffix = token_ids[length - size:]
        first = suffix[0]
        # The occurrence ending at the last token is the suffix itself: it has no continuation.
        for start in range(length - size):
            if token_ids[start] == first and token_ids[start:start + size] == suffix:
                end = start + size
                return token_ids[end:min(end + num_tokens, length)]
    return []
