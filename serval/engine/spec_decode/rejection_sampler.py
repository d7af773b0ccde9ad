"""Which drafted tokens the target keeps: speculative sampling that preserves the target's distribution.

A request with d drafted tokens is verified on d + 1 rows of target logits: row j is the target's next-token
distribution p_j after the tokens before draft j. Draft j (drawn from q_j; a point mass for proposers that
propose without a distribution: n-gram, suffix, replay) is accepted with probability min(1, p_j(x) / q_j(x)).
The first rejection draws from the residual max(0, p_j - q_j), renormalized, and ends the step; if every draft is
accepted, one more token is drawn from p_d. Each emitted token is then distributed exactly as p (Leviathan et al.
2023, Chen et al. 2023). Greedy requests keep the drafts equal to the target's argmax, then the argmax itself.

p_j is what the plain sampler would draw from had d_1..d_{j-1} been generated: allowed_token_ids and logit_bias,
then bad_words, min_tokens and the penalties counting the drafts before row j as output, the grammar's mask after
them, then temperature, min_p, top_k, top_p (sampler.warp_logits). A draft the grammar rejects has p_j(x) = 0
and is always rejected; the matcher itself is left where it was (draft_bitmasks rolls it back), and the output
processor advances it through the tokens kept, so afterwards it holds exactly those.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from serval.engine import sampler
from serval.engine.request import Request
from serval.outputs import Logprob
from serval.sampling_params import SAMPLING_EPS, SamplingParams


@dataclass
class VerifiedTokens:
    """One request's result of a verify step."""
    token_ids: list[int]  # accepted drafts, then one token of the target's own (1..num_draft_tokens + 1 tokens)
    logprobs: list[dict[int, Logprob]] | None  # per token, the target's raw logprobs, when the request asked
    num_draft_tokens: int

    @property
    def num_accepted(self) -> int:
        return len(self.token_ids) - 1


def verify(logits: torch.Tensor, requests: list[Request], draft_token_ids: list[list[int]],
           draft_probs: torch.Tensor | None = None) -> list[VerifiedTokens]:
    """logits [sum(d_i + 1), V]: request i's d_i + 1 rows in order. draft_probs [sum(d_i), V]: the distributions
    the drafts were drawn from, or None for point masses. Consumes float32 logits."""
    logits = logits.float()
    row_requests = [request for request, drafts in zip(requests, draft_token_ids) for _ in range(len(drafts) + 1)]
    params = [request.sampling_params for request in row_requests]
    starts = _row_starts(draft_token_ids)
    logprob_rows = [row for row, p in enumerate(params) if p.logprobs is not None]
    raw_logits = logits[logprob_rows].clone() if logprob_rows else None
    sampler.apply_allowed_token_ids(logits, params)
    sampler.apply_logit_bias(logits, params)
    _apply_history_processing(logits, requests, draft_token_ids, starts)
    _apply_grammar_masks(logits, requests, draft_token_ids, starts)
    greedy = [p.temperature < SAMPLING_EPS for p in params]
    if all(greedy):
        greedy_tokens = sampler.argmax(logits).tolist()
        emitted = [_accept_greedy(drafts, greedy_tokens[start:start + len(drafts) + 1])
                   for start, drafts in zip(starts, draft_token_ids)]
    else:
        emitted = _accept_random(logits, row_requests, params, draft_token_ids, starts, draft_probs, greedy,
                                 sampler.argmax(logits) if any(greedy) else None)
    return [VerifiedTokens(tokens, _logprobs(raw_logits, logprob_rows, start, tokens, request), len(drafts))
            for request, drafts, start, tokens in zip(requests, draft_token_ids, starts, emitted)]


@dataclass
class DraftPosition:
    """A verify row's request as the plain sampler would see it had the drafts before the row been generated: what
    bad_words, min_tokens and the penalties read (sampler.apply_history_processing)."""
    sampling_params: SamplingParams
    eos_token_id: int | None
    all_token_ids: list[int]
    output_token_ids: list[int]


def _needs_history(request: Request) -> bool:
    params = request.sampling_params
    return (request.num_output_tokens < params.min_tokens or params.repetition_penalty != 1.0
            or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
            or bool(params.bad_words_token_ids))


def _apply_history_processing(logits: torch.Tensor, requests: list[Request], draft_token_ids: list[list[int]],
                              starts: list[int]) -> None:
    """bad_words, min_tokens and the penalties, row j of a request counting its drafts before j as generated
    tokens."""
    rows, positions = [], []
    for request, drafts, start in zip(requests, draft_token_ids, starts):
        if not _needs_history(request):
            continue
        for j in range(len(drafts) + 1):
            rows.append(start + j)
            positions.append(DraftPosition(request.sampling_params, request.eos_token_id,
                                           request.all_token_ids + drafts[:j], request.output_token_ids + drafts[:j]))
    if rows:
        index = sampler.to_device(rows, torch.int64, logits.device)
        sub = logits[index]
        sampler.apply_history_processing(sub, positions)
        logits[index] = sub


def _apply_grammar_masks(logits: torch.Tensor, requests: list[Request], draft_token_ids: list[list[int]],
                         starts: list[int]) -> None:
    """Structured outputs: each row of a constrained request masked with its grammar's mask after the drafts
    before it."""
    constrained = [i for i, request in enumerate(requests) if request.grammar is not None]
    if not constrained:
        return
    from serval.engine import structured_output as structured  # llguidance loads only when a request asks for it
    bitmask = structured.draft_bitmasks([requests[i].grammar for i in constrained],
                                        [draft_token_ids[i] for i in constrained],
                                        pin_memory=logits.device.type == "cuda")
    positions = [(i, j) for i in constrained for j in range(len(draft_token_ids[i]) + 1)]
    # As the plain sampler: where min_tokens masked EOS at a position, the grammar wins.
    early = [k for k, (i, j) in enumerate(positions)
             if requests[i].num_output_tokens + j < requests[i].sampling_params.min_tokens]
    sampler.apply_grammar_bitmask(logits, bitmask, [starts[i] + j for i, j in positions], early)


def _row_starts(draft_token_ids: list[list[int]]) -> list[int]:
    starts, row = [], 0
    for drafts in draft_token_ids:
        starts.append(row)
        row += len(drafts) + 1
    return starts


def _accept_greedy(drafts: list[int], target: list[int]) -> list[int]:
    for j, draft in enumerate(drafts):
        if draft != target[j]:
            return target[:j + 1]
    return target


def _accept_random(logits: torch.Tensor, row_requests: list[Request], params, draft_token_ids: list[list[int]],
                   starts: list[int], draft_probs: torch.Tensor | None, greedy: list[bool],
                   greedy_argmax: torch.Tensor | None) -> list[list[int]]:
    """Every row's acceptance test and fallback draw is made on the device in one batch; the host then walks
    each request's rows to its first rejection. Acceptances, fallbacks and greedy rows' argmax come back in one
    read: each read waits for the device, and a verify step's device idles until the host has its tokens."""
    device = logits.device
    probs = sampler.warp_logits(logits, params).softmax(dim=-1)
    num_rows = probs.shape[0]
    # q per row: the draft's distribution on draft rows; zero on each request's last (bonus) row, which makes the
    # residual p itself there.
    draft_rows = [start + j for start, drafts in zip(starts, draft_token_ids) for j in range(len(drafts))]
    flat_drafts = [token for drafts in draft_token_ids for token in drafts]
    q = torch.zeros_like(probs)
    if draft_rows:
        rows = sampler.to_device(draft_rows, torch.int64, device)
        tokens = sampler.to_device(flat_drafts, torch.int64, device)
        if draft_probs is None:
            q[rows, tokens] = 1.0
        else:
            q[rows] = draft_probs.to(device, torch.float32)
    drafts_per_row = torch.zeros(num_rows, dtype=torch.int64, device=device)
    if draft_rows:
        drafts_per_row[rows] = tokens
    p_draft = probs.gather(1, drafts_per_row.unsqueeze(1)).squeeze(1)
    q_draft = q.gather(1, drafts_per_row.unsqueeze(1)).squeeze(1)
    uniform = _uniform(num_rows, row_requests, device)
    # u < p / q, written without the division (q > 0 wherever a draft token could come from).
    accepted = uniform * q_draft < p_draft
    residual = (probs - q).clamp_(min=0.0)
    # A residual of all zeros (p == q, rejection impossible) would give NaN: fall back to p, never drawn anyway.
    empty = residual.sum(dim=-1, keepdim=True) <= 0
    residual = torch.where(empty, probs, residual)
    fallback = sampler.argmax(residual.div_(_exponential(residual, row_requests)))
    read = torch.stack([accepted.long(), fallback] + ([greedy_argmax] if greedy_argmax is not None else [])).tolist()
    accepted, fallback = read[0], read[1]
    greedy_tokens = read[2] if greedy_argmax is not None else None
    emitted = []
    for start, drafts in zip(starts, draft_token_ids):
        tokens = []
        for j in range(len(drafts) + 1):
            row = start + j
            if greedy[row]:
                tokens.append(greedy_tokens[row])
                if j == len(drafts) or greedy_tokens[row] != drafts[j]:
                    break
            elif j < len(drafts) and accepted[row]:
                tokens.append(drafts[j])
            else:
                tokens.append(fallback[row])
                break
        emitted.append(tokens)
    return emitted


def _uniform(num_rows: int, row_requests: list[Request], device: torch.device) -> torch.Tensor:
    """U(0, 1) per row; a seeded request's rows draw from its own generator (its tokens don't depend on the batch)."""
    uniform = torch.rand(num_rows, device=device)
    for row, request in enumerate(row_requests):
        if request.generator is not None:
            uniform[row] = torch.rand(1, generator=request.generator, device=request.generator.device)[0]
    return uniform


def _exponential(probs: torch.Tensor, row_requests: list[Request]) -> torch.Tensor:
    """Exp(1) noise: argmax(probs / noise) is a draw from probs (the exponential race, as the plain sampler)."""
    noise = torch.empty_like(probs).exponential_()
    for row, request in enumerate(row_requests):
        if request.generator is not None:
            noise[row].exponential_(generator=request.generator)
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


def _logprobs(raw_logits: torch.Tensor | None, logprob_rows: list[int], start: int, tokens: list[int],
              request: Request) -> list[dict[int, Logprob]] | None:
    num_top = request.sampling_params.logprobs
    if num_top is None:
        return None
    first = logprob_rows.index(start)
    rows = raw_logits[first:first + len(tokens)]
    return sampler.compute_prompt_logprobs(rows, torch.tensor(tokens), num_top)
