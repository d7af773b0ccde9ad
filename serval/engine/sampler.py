"""Sampler: logits of the rows being sampled → one token per request, plus logprobs when asked.

Order of operations follows vLLM v1's sampler, so the same request gives the same distribution on either engine:
raw logprobs (before any processing) → allowed_token_ids mask → logit_bias → bad_words mask → min_tokens mask →
repetition/frequency/presence penalties → grammar bitmask (structured outputs) → greedy argmax, or temperature →
min_p → top_k → top_p → exponential-race draw. (The masks set -inf, which no later step lifts, so where they sit
among the additive steps changes nothing.)

Everything is vectorized over the batch with per-row parameter tensors; Python loops only build the ragged
index lists (bias entries, penalized tokens) and draw the seeded rows from their own generators.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from serval.engine.profiler import host_range
from serval.engine.request import Request
from serval.outputs import Logprob
from serval.sampling_params import SAMPLING_EPS, SamplingParams

_NEG_INF = float("-inf")


@dataclass
class SamplerOutput:
    sampled_token_ids: list[int]  # one per request
    # Per request: None unless sampling_params.logprobs is not None; else {sampled token: Logprob(rank=its rank)}
    # plus the top-`logprobs` alternatives ranked 1..k.
    logprobs: list[dict[int, Logprob] | None]


def sample(logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
    """Sample one token per row of logits [B, V] (row i is requests[i]).

    The logits are consumed: float32 logits are modified in place, as in vLLM (a copy of [B, V] per step is
    pure overhead for the runner, which doesn't look at them again).
    """
    logits = logits.float()
    params = [request.sampling_params for request in requests]
    logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    # vLLM's default logprobs mode ("raw_logprobs"): what the model said, before any processing.
    raw_logprobs = torch.log_softmax(logits[logprob_rows], dim=-1) if logprob_rows else None
    token_ids = sample_token_tensor(logits, requests)

    logprobs: list[dict[int, Logprob] | None] = [None] * len(requests)
    if raw_logprobs is not None:
        chosen = token_ids[logprob_rows]
        entries = _logprob_entries(raw_logprobs, chosen, [params[i].logprobs for i in logprob_rows])
        for row, entry in zip(logprob_rows, entries):
            logprobs[row] = entry
    return SamplerOutput(sampled_token_ids=token_ids.tolist(), logprobs=logprobs)


def sample_token_tensor(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """The sampled token ids [B] (int64, on the logits' device), without waiting for the device: nothing here
    reads a result back, so the runner can queue the next step before these are known (asynchronous
    scheduling). Consumes float32 logits as sample() does."""
    logits = logits.float()
    params = [request.sampling_params for request in requests]
    apply_allowed_token_ids(logits, params)
    apply_logit_bias(logits, params)
    apply_history_processing(logits, requests)
    _apply_grammar_mask(logits, requests)
    return _sample_tokens(logits, requests)


def apply_history_processing(logits: torch.Tensor, requests: list) -> None:
    """bad_words, min_tokens, then the penalties: the processing that reads the tokens generated so far, in place.
    requests: per row, a Request or anything with its sampling_params, eos_token_id, all_token_ids and
    output_token_ids (speculative verification passes each draft position's view)."""
    _apply_bad_words(logits, requests)
    _apply_min_tokens(logits, requests)
    _apply_penalties(logits, requests)


def compute_prompt_logprobs(logits: torch.Tensor, target_token_ids: torch.Tensor,
                            num_top: int) -> list[dict[int, Logprob]]:
    """Row j: the logprob (and rank) of target_token_ids[j] under logits[j], plus the top-num_top alternatives."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return _logprob_entries(logprobs, target_token_ids.to(logprobs.device, torch.int64), [num_top] * len(logprobs))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                      max_top_k: int | None = None) -> torch.Tensor:
    """Mask to -inf what top_k [B] (int, V = off) and top_p [B] (float, 1.0 = off) drop; returns new logits.

    top_p keeps the smallest set of most likely tokens whose probability, renormalized after top_k, reaches
    top_p; the most likely token always stays. Ties at the top_k threshold are all kept. max_top_k (top_k's
    largest value, when the caller knows it) saves reading it back from the device.
    """
    if top_k is None and top_p is None:
        return logits
    if top_p is None:
        # top_k alone needs no full sort: the k-th largest value is the threshold.
        max_k = max_top_k if max_top_k is not None else int(top_k.max())
        top_values = logits.topk(max_k, dim=-1).values
        threshold = top_values.gather(1, (top_k - 1).clamp(min=0).unsqueeze(1))
        return logits.masked_fill(logits < threshold, _NEG_INF)
    sorted_logits, order = logits.sort(dim=-1)  # ascending: masks grow from the left
    if top_k is not None:
        threshold = sorted_logits.gather(1, (logits.shape[1] - top_k).clamp(min=0).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < threshold, _NEG_INF)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Drop the least likely tokens while the mass dropped stays within 1 - top_p.
    drop = cumulative <= 1 - top_p.unsqueeze(1)
    drop[:, -1] = False
    sorted_logits.masked_fill_(drop, _NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> None:
    rows, cols, values = [], [], []
    for row, p in enumerate(params):
        if p.logit_bias:
            for token_id, bias in p.logit_bias.items():
                rows.append(row)
                cols.append(token_id)
                values.append(bias)
    if rows:
        index = (_tensor(rows, logits), _tensor(cols, logits))
        logits.index_put_(index, to_device(values, logits.dtype, logits.device), accumulate=True)


def apply_allowed_token_ids(logits: torch.Tensor, params: list[SamplingParams]) -> None:
    """vLLM's allowed_token_ids: every other token gets -inf, at every position alike."""
    rows = [row for row, p in enumerate(params) if p.allowed_token_ids is not None]
    if not rows:
        return
    disallowed = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    disallowed[_tensor(rows, logits)] = True
    allowed_rows = [row for row in rows for _ in params[row].allowed_token_ids]
    allowed_cols = [token_id for row in rows for token_id in params[row].allowed_token_ids]
    disallowed[_tensor(allowed_rows, logits), _tensor(allowed_cols, logits)] = False
    logits.masked_fill_(disallowed, _NEG_INF)


def _apply_bad_words(logits: torch.Tensor, requests: list[Request]) -> None:
    """vLLM's bad_words: a word's last token gets -inf where the tokens generated last are the word's others (a
    one-token word's, always). Only generated tokens count, as in vLLM: a word the prompt began may be finished."""
    rows, cols = [], []
    for row, request in enumerate(requests):
        words = request.sampling_params.bad_words_token_ids
        if words:
            banned = _banned_next_tokens(request.output_token_ids, words)
            rows.extend([row] * len(banned))
            cols.extend(banned)
    if rows:
        logits[_tensor(rows, logits), _tensor(cols, logits)] = _NEG_INF


def _banned_next_tokens(output_token_ids: list[int], bad_words_token_ids: list[list[int]]) -> list[int]:
    """The tokens that would complete a bad word after output_token_ids."""
    num_output = len(output_token_ids)
    banned = []
    for word in bad_words_token_ids:
        num_before = len(word) - 1
        # The last token is compared first: a request with many long words pays for slicing only near a match.
        if num_before == 0 or (num_before <= num_output and output_token_ids[-1] == word[-2]
                               and output_token_ids[num_output - num_before:] == word[:-1]):
            banned.append(word[-1])
    return banned


def _apply_min_tokens(logits: torch.Tensor, requests: list[Request]) -> None:
    """Until min_tokens are out, no token may end the request: EOS (unless ignored) and the stop token ids."""
    rows, cols = [], []
    for row, request in enumerate(requests):
        p = request.sampling_params
        if len(request.output_token_ids) >= p.min_tokens:
            continue
        blocked = list(p.stop_token_ids)
        if request.eos_token_id is not None and not p.ignore_eos:
            blocked.append(request.eos_token_id)
        rows.extend([row] * len(blocked))
        cols.extend(blocked)
    if rows:
        logits[_tensor(rows, logits), _tensor(cols, logits)] = _NEG_INF


def _apply_penalties(logits: torch.Tensor, requests: list[Request]) -> None:
    """Repetition penalty over prompt + output tokens (CTRL paper); OpenAI's frequency/presence over output only."""
    rows = [i for i, r in enumerate(requests) if _has_penalties(r.sampling_params)]
    if not rows:
        return
    penalized = [requests[i] for i in rows]
    params = [r.sampling_params for r in penalized]
    sub = logits[rows]
    vocab_size = logits.shape[1]
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = _token_counts([r.all_token_ids for r in penalized], vocab_size, logits) > 0
        penalty = to_device([p.repetition_penalty for p in params], torch.float32, logits.device).unsqueeze(1)
        sub = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
    if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
        counts = _token_counts([r.output_token_ids for r in penalized], vocab_size, logits)
        frequency = to_device([p.frequency_penalty for p in params], torch.float32, logits.device).unsqueeze(1)
        presence = to_device([p.presence_penalty for p in params], torch.float32, logits.device).unsqueeze(1)
        sub = sub - frequency * counts - presence * (counts > 0).float()
    logits[rows] = sub


def _apply_grammar_mask(logits: torch.Tensor, requests: list[Request]) -> None:
    """Structured outputs: tokens the request's grammar can't take next get -inf (one bitmask for the batch)."""
    rows = [row for row, request in enumerate(requests) if request.grammar is not None]
    if not rows:
        return
    from serval.engine import structured_output as structured  # llguidance loads only when a request asks for it
    states = [requests[row].grammar for row in rows]
    # The masks a worker thread filled while the logits were computed, where the engine started one.
    with host_range("serval.grammar_join"):
        bitmask = structured.next_token_bitmask(states, pin_memory=logits.device.type == "cuda")
    early = [i for i, row in enumerate(rows)
             if requests[row].num_output_tokens < requests[row].sampling_params.min_tokens]
    apply_grammar_bitmask(logits, bitmask, rows, early)


def apply_grammar_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int], early: list[int]) -> None:
    """In place: logits row rows[i] gets -inf where bitmask row i (int32 words, on the host) disallows a token.
    early: indexes i whose min_tokens masked EOS, which may be the only token the grammar allows (a complete
    output): there the grammar wins, the row keeping only what it allows."""
    from serval.engine import structured_output as structured  # llguidance loads only when a request asks for it
    whole = rows == list(range(logits.shape[0]))
    if logits.device.type == "cuda" and not early and logits.stride(1) == 1:
        from serval.kernels.triton_bitmask import apply_token_bitmask_
        # From pinned memory the copy is queued behind the step's kernels; one launch masks every row.
        apply_token_bitmask_(logits, bitmask.to(logits.device, non_blocking=bitmask.is_pinned()),
                             None if whole else _tensor(rows, logits))
        return
    disallowed = structured.disallowed_mask_on(bitmask, logits.shape[1], logits.device)
    if whole:
        logits.masked_fill_(disallowed, _NEG_INF)
        sub = logits
    else:
        index = _tensor(rows, logits)
        sub = logits[index].masked_fill_(disallowed, _NEG_INF)
        logits[index] = sub
    for i in early:
        if bool(torch.isneginf(sub[i]).all()):
            sub[i] = torch.where(disallowed[i], _NEG_INF, 0.0)
            logits[rows[i]] = sub[i]


def _has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _token_counts(token_lists: list[list[int]], vocab_size: int, like: torch.Tensor) -> torch.Tensor:
    """[len(token_lists), vocab_size] float counts of each token id per row."""
    rows = [row for row, tokens in enumerate(token_lists) for _ in tokens]
    cols = [token for tokens in token_lists for token in tokens]
    counts = torch.zeros(len(token_lists), vocab_size, dtype=torch.float32, device=like.device)
    if cols:
        counts.index_put_((_tensor(rows, like), _tensor(cols, like)),
                          torch.ones(len(cols), dtype=torch.float32, device=like.device), accumulate=True)
    return counts


def _sample_tokens(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    params = [request.sampling_params for request in requests]
    greedy = [p.temperature < SAMPLING_EPS for p in params]
    if all(greedy):
        return argmax(logits)
    greedy_tokens = argmax(logits) if any(greedy) else None
    probs = warp_logits(logits, params).softmax(dim=-1)
    random_tokens = argmax(probs.div_(_exponential_noise(probs, requests, greedy)))
    if greedy_tokens is None:
        return random_tokens
    return torch.where(to_device(greedy, torch.bool, logits.device), greedy_tokens, random_tokens)


def argmax(scores: torch.Tensor) -> torch.Tensor:
    """scores [rows, vocab] -> each row's first index of the largest, int64 [rows] (torch.argmax(dim=-1)): on CUDA
    serval.kernels.triton_argmax's kernel, since torch's ran each row as one thread block (27 us a token)."""
    if not scores.is_cuda:
        return scores.argmax(dim=-1)
    from serval.kernels import triton_argmax
    return triton_argmax.argmax(scores)


def warp_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature → min_p → top_k → top_p, the logits a random draw is made from (greedy rows: temperature 1).
    Scales float32 logits in place; returns the masked logits (speculative verification draws from the same)."""
    device = logits.device
    greedy = [p.temperature < SAMPLING_EPS for p in params]
    temperature = to_device([1.0 if g else p.temperature for g, p in zip(greedy, params)], torch.float32, device)
    logits.div_(temperature.unsqueeze(1))

    if any(p.min_p > 0.0 for p in params):
        probs = logits.softmax(dim=-1)
        min_p = to_device([p.min_p for p in params], torch.float32, device)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
        logits.masked_fill_(probs < threshold, _NEG_INF)

    vocab_size = logits.shape[1]
    top_k = [p.top_k if p.top_k > 0 else vocab_size for p in params]
    top_p = [p.top_p for p in params]
    logits = apply_top_k_top_p(
        logits,
        to_device([min(k, vocab_size) for k in top_k], torch.int64, device) if any(k < vocab_size for k in top_k)
        else None,
        to_device(top_p, torch.float32, device) if any(p < 1.0 for p in top_p) else None,
        max_top_k=min(max(top_k), vocab_size))
    return logits


def _exponential_noise(probs: torch.Tensor, requests: list[Request], greedy: list[bool]) -> torch.Tensor:
    """q ~ Exp(1) per entry; argmax(probs / q) is a draw from probs (the exponential race).

    A seeded row draws only from its own generator, so its tokens don't depend on the rest of the batch; the
    other rows share the default RNG in one batched draw.
    """
    noise = torch.empty_like(probs)
    seeded = [row for row, r in enumerate(requests) if r.generator is not None and not greedy[row]]
    if len(seeded) < len(requests):
        noise.exponential_()
    for row in seeded:
        noise[row].exponential_(generator=requests[row].generator)
    # A draw of exactly 0 would turn a masked token's 0 / 0 into NaN, which argmax picks.
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


def _logprob_entries(logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: list[int]) -> list[dict[int, Logprob]]:
    """Per row: {token: Logprob with rank = 1 + #tokens strictly more likely}, then the top num_top[row]."""
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    max_top = max(num_top, default=0)
    top_values, top_ids = (logprobs.topk(max_top, dim=-1) if max_top > 0 else (None, None))
    chosen_list, rank_list, id_list = chosen.squeeze(1).tolist(), ranks.tolist(), token_ids.tolist()
    top_value_list = top_values.tolist() if top_values is not None else None
    top_id_list = top_ids.tolist() if top_ids is not None else None
    entries = []
    for row, k in enumerate(num_top):
        entry = {id_list[row]: Logprob(logprob=chosen_list[row], rank=rank_list[row])}
        for j in range(k):
            entry.setdefault(top_id_list[row][j], Logprob(logprob=top_value_list[row][j], rank=j + 1))
        entries.append(entry)
    return entries


def _tensor(values: list[int], like: torch.Tensor) -> torch.Tensor:
    return to_device(values, torch.int64, like.device)


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device. From pinned memory the copy is queued behind the step's kernels rather
    than waited for, which a plain torch.tensor(..., device="cuda") would do."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
