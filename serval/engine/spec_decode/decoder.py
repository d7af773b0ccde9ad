"""SpecDecoder: the engine's speculative-decoding hooks around a step, and their counters.

Per step: propose() sets request.spec_token_ids on running requests that are decoding; the scheduler schedules
each request's last token plus its drafts (dropping drafts that don't fit the token budget or the block pool rather
than preempting anyone); the runner verifies the k + 1 rows in the same forward as everything else; accept()
turns back the computed-token count over rejected drafts and frees the blocks only they used:

    before:   tokens [0, T)                  computed [0, T-1)   drafts d_1..d_k
    verify:   positions T-1 .. T+k-1 written (k + 1 slots; blocks allocated for T + k tokens)
    after:    a drafts accepted + 1 token     tokens [0, T+a+1)   computed [0, T+a): K/V of rejected drafts is
              garbage past the computed end; blocks wholly past it go back to the pool (kv_cache.free_tail)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from serval.engine.kv_cache import KVCacheManager
from serval.engine.request import Request
from serval.engine.spec_decode.config import SpeculativeConfig
from serval.engine.spec_decode.ngram import propose_ngram
from serval.engine.spec_decode.rejection_sampler import VerifiedTokens
from serval.engine.spec_decode.replay import ReplayProposer
from serval.engine.spec_decode.suffix import SuffixIndex

logger = logging.getLogger(__name__)


@dataclass
class SpecDecodeStats:
    """Cumulative counters, vLLM's spec_decode_* metrics."""
    num_drafts: int = 0  # verify steps of one request that had at least one drafted token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)  # [j]: drafts accepted at position j
    num_disabled_steps: int = 0  # steps that didn't speculate because the batch was at least disable_by_batch_size


# Methods whose drafts are known when proposed; a draft model's are placeholders until the runner fills them.
DRAFTS_KNOWN_WHEN_PROPOSED = ("ngram", "suffix", "replay")


def can_speculate(request: Request) -> bool:
    """Whether the request's next tokens may be drafted. Penalties, min_tokens and grammars are applied to each
    verify row as if the drafts before it had been generated (rejection_sampler), so they speculate too."""
    params = request.sampling_params
    return (not params.disable_speculation and params.max_tokens != 0
            and request.num_tokens - request.num_computed_tokens == 1)


class SpecDecoder:
    def __init__(self, config: SpeculativeConfig, vocab_size: int) -> None:
        self.config = config
        self.stats = SpecDecodeStats(num_accepted_tokens_per_pos=[0] * config.num_speculative_tokens)
        self.suffix_index = (SuffixIndex(config.suffix_decoding_max_cached_requests,
                                         config.suffix_decoding_max_tree_depth) if config.method == "suffix" else None)
        self.replay = (ReplayProposer(config.acceptance_rate, vocab_size, config.seed) if config.method == "replay"
                       else None)

    def propose(self, running: list[Request]) -> None:
        """Set spec_token_ids on each running request that may speculate this step ([] on the others)."""
        limit = self.config.disable_by_batch_size
        disabled = limit is not None and len(running) >= limit
        if disabled and running:
            self.stats.num_disabled_steps += 1
        for request in running:
            request.spec_token_ids = [] if disabled or not can_speculate(request) else self._drafts(request)
            if request.grammar is not None and request.spec_token_ids and self.drafts_known_when_proposed:
                # Only drafts the grammar takes are worth verifying: the first it rejects would be rejected anyway.
                del request.spec_token_ids[request.grammar.num_valid(request.spec_token_ids):]

    def drafts_nothing(self, requests: list[Request], num_running: int) -> bool:
        """Whether the requests' next step has no drafts whatever tokens the step before it brings: the batch is at
        disable_by_batch_size, or every request opted out. Asynchronous scheduling queues such a step before the
        previous step's tokens reach the host (proposing any other step needs them)."""
        limit = self.config.disable_by_batch_size
        return (limit is not None and num_running >= limit) or not any(
            not request.sampling_params.disable_speculation for request in requests)

    def count_queued_step(self, num_running: int) -> None:
        """A step queued without drafts (drafts_nothing) counts as propose() would have counted it."""
        limit = self.config.disable_by_batch_size
        if limit is not None and num_running >= limit:
            self.stats.num_disabled_steps += 1

    @property
    def overlaps_steps(self) -> bool:
        """Whether asynchronous scheduling may queue this method's steps without drafts: a draft model or an
        EAGLE-3 head must follow every target step (its K/V, its hidden states), which a queued decode step skips."""
        return self.config.method in DRAFTS_KNOWN_WHEN_PROPOSED

    @property
    def drafts_known_when_proposed(self) -> bool:
        return self.config.method in DRAFTS_KNOWN_WHEN_PROPOSED

    def grammar_fill_drafts(self, requests: list[Request]) -> tuple[list[Request], list[list[int]]]:
        """Of the scheduled constrained requests whose masks can be filled before the forward, each with the drafts
        its verify rows follow. A draft model's requests with drafts are left out: their drafts are known only
        after the runner's draft steps, and their masks are filled at verification."""
        known = [request for request in requests if request.spec_token_ids == [] or self.drafts_known_when_proposed]
        return known, [list(request.spec_token_ids) for request in known]

    def _drafts(self, request: Request) -> list[int]:
        # a + 1 tokens come out of a verify step: keep them within max_tokens and the context.
        room = min(request.max_tokens - request.num_output_tokens, request.max_model_len - request.num_tokens) - 1
        num_tokens = min(self.config.num_speculative_tokens, room)
        if num_tokens <= 0:
            return []
        config = self.config
        if config.method == "ngram":
            return propose_ngram(request.all_token_ids, num_tokens, config.prompt_lookup_min, config.prompt_lookup_max)
        if config.method == "suffix":
            return self.suffix_index.propose(request.all_token_ids, num_tokens)
        if config.method in ("draft_model", "eagle3"):
            # Placeholders: the draft model (or EAGLE-3 head) fills them in the runner once the scheduler has
            # allocated their slots.
            return [0] * num_tokens
        return self.replay.propose(request.prompt_token_ids, request.output_token_ids, num_tokens)

    def accept(self, requests: list[Request], verified: list[VerifiedTokens | None], kv_cache: KVCacheManager) -> None:
        """After scheduler.update counted every scheduled row as computed: un-count the rejected drafts, free the
        blocks only they used, clear the drafts, count."""
        stats = self.stats
        for request, result in zip(requests, verified):
            request.spec_token_ids = []
            if result is None:
                continue
            num_rejected = result.num_draft_tokens - result.num_accepted
            request.num_computed_tokens -= num_rejected
            kv_cache.free_tail(request, request.num_computed_tokens)
            request.num_spec_draft_tokens += result.num_draft_tokens
            request.num_spec_accepted_tokens += result.num_accepted
            request.num_spec_steps += 1
            stats.num_drafts += 1
            stats.num_draft_tokens += result.num_draft_tokens
            stats.num_accepted_tokens += result.num_accepted
            for position in range(result.num_accepted):
                stats.num_accepted_tokens_per_pos[position] += 1

    def on_finished(self, request: Request) -> None:
        if self.suffix_index is not None:
            self.suffix_index.add(request.all_token_ids)


def acceptance_length(request: Request) -> float | None:
    """Mean tokens a verify step of the request produced (accepted drafts + 1); None if it never speculated."""
    if not request.num_spec_steps:
        return None
    return 1.0 + request.num_spec_accepted_tokens / request.num_spec_steps
