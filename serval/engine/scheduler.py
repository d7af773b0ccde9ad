"""Scheduler: which requests run this step and how many new tokens each computes.

There is no prefill/decode split (as in vLLM v1): every request has num_computed_tokens and
num_tokens, and a step computes some of the difference under the token budget, so chunked prefills
and decodes share a step. Running requests go first, oldest first; when blocks run out the newest
(or lowest-priority) running request is preempted by recompute: its blocks are freed and it waits
again with its output so far, to be recomputed (mostly from the prefix cache) later.

A long prefill takes at most config.long_prefill_cap() tokens while the others get theirs, so waiting requests are
admitted and later-admitted decodes run in the steps where a long prompt is still prefilling. The budget left
after that goes back to the capped prefills, oldest first, so a prompt alone still fills whole steps.
"""
from __future__ import annotations

import bisect
import itertools
import time
from dataclasses import dataclass, field

from serval.config import EngineConfig
from serval.engine.kv_cache import KVCacheManager
from serval.engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    requests: list[Request] = field(default_factory=list)  # the batch, in order
    num_scheduled_tokens: list[int] = field(default_factory=list)  # new tokens per request, same order
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    def add(self, request: Request, num_tokens: int) -> None:
        self.requests.append(request)
        self.num_scheduled_tokens.append(num_tokens)

    def remove(self, request: Request) -> int:
        index = self.requests.index(request)
        del self.requests[index]
        return self.num_scheduled_tokens.pop(index)


class Scheduler:
    def __init__(self, config: EngineConfig, kv_cache: KVCacheManager) -> None:
        """config has max_num_batched_tokens resolved (see engine._resolve_config)."""
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.enable_chunked_prefill = config.enable_chunked_prefill
        self.long_prefill_cap = config.long_prefill_cap()
        self.use_priority = config.scheduling_policy == "priority"
        self.max_loras = config.max_loras if config.enable_lora else None
        self.kv_cache = kv_cache
        self.waiting: list[tuple[tuple, Request]] = []  # sorted by _waiting_key
        self.running: list[Request] = []  # in admission order
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._arrival_counter = itertools.count()

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        request.arrival_order = next(self._arrival_counter)
        self._enqueue(request)

    def schedule(self, pending: frozenset[int] = frozenset()) -> SchedulerOutput:
        """pending: id() of the running requests whose next token is still on the device (asynchronous
        scheduling queues this step behind the one sampling it): each computes that token as its one new token,
        its input id taken on the device; one known to stop with it (its length limit) is left out."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_left = self._num_left(request, pending)
            if num_left <= 0:
                index += 1
                continue
            num_new = min(num_left + self._num_drafts(request), budget, self.long_prefill_cap)
            while not self.kv_cache.allocate(request, num_new):
                if num_new > num_left:  # drafts are worth no preemption: verify none this step
                    num_new = min(num_left, budget, self.long_prefill_cap)
                    continue
                victim = max(self.running, key=self._waiting_key)
                if self.running.index(victim) < index:
                    index -= 1
                if victim in out.requests:
                    budget += out.remove(victim)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                # The drafts the runner verifies are those the budget left room for.
                del request.spec_token_ids[max(num_new - num_left, 0):]
                out.add(request, num_new)
                budget -= num_new
                index += 1
        if not out.preempted:
            budget = self._admit_waiting(out, budget)
            self._extend_capped_prefills(out, budget)
        return out

    def update(self, out: SchedulerOutput) -> list[Request]:
        """Advance the batch's computed tokens after the forward pass; return the requests whose step
        ended on their last known token, i.e. those that sampled a new token."""
        sampled = []
        for request, num_tokens in zip(out.requests, out.num_scheduled_tokens):
            request.num_computed_tokens += num_tokens
            if request.num_computed_tokens == request.num_tokens:
                sampled.append(request)
        return sampled

    def finish_request(self, request: Request, status: RequestStatus) -> None:
        """Finish (stop, length or abort) a request wherever it is; frees its blocks."""
        assert status.finished
        if request.status.finished:
            return
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove((self._waiting_key(request), request))
        self.kv_cache.free(request)
        request.status = status
        request.finished_time = time.monotonic()
        del self.requests[request.request_id]

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> int:
        """Admit waiting requests in order while the budget, the sequence slots and the blocks allow; return the
        budget left."""
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0][1]
            if not self._lora_fits(request):
                break  # its adapter would be one more than the resident slots hold: it waits for one to free
            cached_block_ids = self.kv_cache.find_cached_prefix(request)
            num_cached = len(cached_block_ids) * self.kv_cache.block_size
            num_new = request.num_tokens - num_cached
            if num_new > budget:
                if not self.enable_chunked_prefill:
                    break
                num_new = budget
            num_new = min(num_new, self.long_prefill_cap)
            if not self.kv_cache.allocate(request, num_new, cached_block_ids):
                break
            self.waiting.pop(0)
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
                request.first_scheduled_time = time.monotonic()
            out.add(request, num_new)
            budget -= num_new
        return budget

    def _lora_fits(self, request: Request) -> bool:
        if self.max_loras is None or request.lora_adapter is None:
            return True
        running = {r.lora_int_id for r in self.running if r.lora_adapter is not None}
        return request.lora_int_id in running or len(running) < self.max_loras

    def _extend_capped_prefills(self, out: SchedulerOutput, budget: int) -> None:
        """Give the budget nobody else wanted to the prefills the cap cut short, oldest first. A top-up takes
        only the blocks that are free: it is worth no preemption."""
        for index, request in enumerate(out.requests):
            if budget <= 0:
                break
            num_scheduled = out.num_scheduled_tokens[index]
            extra = min(request.num_tokens - request.num_computed_tokens - num_scheduled, budget,
                        self.kv_cache.num_allocatable_tokens(request) - num_scheduled)
            # allocate counts from num_computed_tokens, which update() advances only after the step: ask for the
            # whole of this step's tokens, and it adds the blocks the extra ones need.
            if extra > 0 and self.kv_cache.allocate(request, num_scheduled + extra):
                out.num_scheduled_tokens[index] += extra
                budget -= extra

    @staticmethod
    def _num_left(request: Request, pending: frozenset[int]) -> int:
        if id(request) not in pending:
            return request.num_tokens - request.num_computed_tokens
        return 0 if request.num_output_tokens + 1 >= request.max_tokens else 1

    @staticmethod
    def _num_drafts(request: Request) -> int:
        """Speculative drafts to verify: only on a decode step (one known token left to compute)."""
        return len(request.spec_token_ids) if request.num_tokens - request.num_computed_tokens == 1 else 0

    def _preempt(self, request: Request) -> None:
        request.spec_token_ids = []
        self.running.remove(request)
        self.kv_cache.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        bisect.insort(self.waiting, (self._waiting_key(request), request), key=lambda item: item[0])

    def _waiting_key(self, request: Request) -> tuple:
        return (request.priority if self.use_priority else 0, request.arrival_order)

