"""One guard session per request: the only thing the server's and the router's handlers call.

    session = open_session(guard, request_id, trace=span)   # a null session when there is no policy
    session.authenticate(headers.get("authorization"))      # or session.use_key(key) after the middleware's check
    try:
        session.admit(model)                                 # the key's models, requests per minute, concurrency
        texts = session.check_input(texts, "messages")       # deny, injection, PII (maybe redacted)
        session.check_prompt_tokens(num_tokens)              # once the (redacted) prompt is tokenized
        session.reserve(num_tokens, max_tokens)              # budget and tokens per minute, held until release
        await session.classify(conversations)                # the guard model, beside the prefill
        text, stopped = session.filter_whole(answer)         # or, streaming, one filter per choice:
        choices = session.choice_filters(n); text, stopped = choices.filter(index, delta, finished)
    finally:
        session.release(prompt_tokens, completion_tokens)    # once, however the request ended

Every method raises GuardRejection (status, OpenAI's error fields) when the guard refuses; the caller turns it
into its own HTTP error. The null session passes everything through, so handlers need no `guard is not None`.
`GuardMetricsObserver` feeds the guard's decisions and rail latencies to the metrics and traces of whichever
process runs the guard (the server or the router).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from serval.guard.decisions import Decision, GuardRejection
from serval.guard.guard import Guard, RequestContext, reload_policy
from serval.guard.keys import Reservation
from serval.guard.output import FilterStep, OutputFilter
from serval.guard.policy import KeyPolicy

__all__ = ["ChoiceFilters", "GuardMetricsObserver", "GuardRejection", "GuardSession", "NullGuardSession",
           "StreamFilter", "open_session", "reload_policy"]


def open_session(guard: Guard | None, request_id: str, trace: Any = None) -> "GuardSession | NullGuardSession":
    """The request's session; a null session (no checks, text passes through) when `guard` is None."""
    ctx = RequestContext(request_id=request_id, trace=trace)
    return GuardSession(guard, ctx) if guard is not None else NullGuardSession(ctx)


class StreamFilter:
    """One streamed choice through the output rails: `push(delta)` gives what is safe to send now, `finish()`
    the rest once the choice has ended. Both return (text, stopped); after a stop, nothing more is sent."""

    def __init__(self, output_filter: OutputFilter | None) -> None:
        self.output_filter = output_filter
        self.stopped = False

    def push(self, delta: str) -> FilterStep:
        if self.output_filter is None:
            return FilterStep(delta, False)
        step = self.output_filter.push(delta)
        self.stopped = step.stopped
        return step

    def finish(self) -> FilterStep:
        if self.output_filter is None:
            return FilterStep("", False)
        step = self.output_filter.finish()
        self.stopped = step.stopped
        return step

    def feed(self, delta: str, finished: bool) -> FilterStep:
        """push, and finish too when this is the choice's last delta."""
        step = self.push(delta)
        if step.stopped or not finished:
            return step
        last = self.finish()
        return FilterStep(step.text + last.text, last.stopped)


class ChoiceFilters:
    """The output rails of one streamed response: a StreamFilter per choice (by index), and which choices a stop
    rail ended, so the stream can end once all of them are."""

    def __init__(self, session: "GuardSession | NullGuardSession", num_choices: int) -> None:
        self.session, self.num_choices = session, num_choices
        self.filters: dict[int, StreamFilter] = {}
        self.stopped: set[int] = set()

    def done(self, index: int) -> bool:
        return index in self.stopped

    @property
    def all_stopped(self) -> bool:
        return len(self.stopped) >= self.num_choices

    def filter(self, index: int, delta: str, finished: bool) -> FilterStep:
        """(text to send, stopped): when stopped, send the text and end the choice with "content_filter"."""
        if index in self.stopped:
            return FilterStep("", True)
        if index not in self.filters:
            self.filters[index] = self.session.stream_filter()
        step = self.filters[index].feed(delta, finished)
        if step.stopped:
            self.stopped.add(index)
        return step


class GuardSession:
    """A request under a policy: the key it came with, its reservation, and whether it was counted in."""

    active = True

    def __init__(self, guard: Guard, ctx: RequestContext) -> None:
        self.guard = guard
        self.ctx = ctx
        self.key: KeyPolicy | None = None
        self.admitted = False
        self.reservation: Reservation | None = None

    @property
    def request_id(self) -> str | None:
        return self.ctx.request_id

    # ---- keys and limits ----
    def authenticate(self, authorization: str | None) -> None:
        """The 'Authorization: Bearer KEY' header against the policy's keys; 401 GuardRejection. No-op when
        the policy has no keys."""
        self.use_key(self.guard.authenticate(authorization, self.ctx))

    def use_key(self, key: KeyPolicy | None) -> None:
        """The key another layer already authenticated (the server's ASGI middleware)."""
        self.key = key
        self.ctx.key_id = key.id if key is not None else None

    def admit(self, model: str) -> None:
        """The key's model list, requests per minute, concurrency and spent budget; 403 or 429. Once admitted,
        the request must be released (`release`), whatever happens next."""
        if self.admitted:
            return
        self.guard.admit(self.key, model, self.ctx)
        self.admitted = True

    def reserve(self, prompt_tokens: int, max_tokens: int) -> None:
        """Hold prompt + max_tokens against the key's budget and tokens per minute until `release`; 429 (with
        retry_after when the window or running requests will free room) when it doesn't fit. `max_tokens` must
        be the real cap on what the request generates (all choices together), or the budget can overshoot."""
        if self.reservation is not None:
            raise RuntimeError("a session reserves once")
        self.reservation = self.guard.reserve(self.key, prompt_tokens + max_tokens, self.ctx)

    def release(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Charge the tokens used, refund the rest of the reservation, count the request out. Acts once."""
        if not self.admitted:
            return
        self.admitted = False
        reservation, self.reservation = self.reservation, None
        self.guard.release(self.key, prompt_tokens, completion_tokens, reservation)

    # ---- input rails ----
    def check_input(self, texts: list[str], param: str = "messages", conversation: bool | None = None) -> list[str]:
        """The texts the model may see (PII redacted where the policy says so); 400 when a rail blocks. Deny rules
        and the injection heuristic read normalised text, and when the texts are one conversation (the default
        for param "messages"; separate completion prompts are not) they also read them joined."""
        return self.guard.check_input(texts, self.ctx, param, conversation)

    def check_prompt_tokens(self, num_tokens: int, param: str = "messages") -> None:
        self.guard.check_prompt_tokens(num_tokens, self.ctx, param)

    @property
    def has_classifier(self) -> bool:
        return self.guard.has_classifier

    async def classify(self, conversations: list[list[dict]], param: str = "messages") -> None:
        """The guard model's verdict on each conversation ([{"role", "content"}]), asked concurrently; 400 when
        one is unsafe and the rule blocks, 503 when there is no verdict and on_error is block."""
        if not self.guard.has_classifier or not conversations:
            return
        await asyncio.gather(*[self.guard.classify_input(c, self.ctx, param) for c in conversations])

    # ---- output rails ----
    @property
    def has_output_rails(self) -> bool:
        return self.guard.policy.has_output_rails

    def filter_whole(self, text: str) -> FilterStep:
        """A whole answer through the output rails: (text, stopped by a stop rail)."""
        output_filter = self.guard.output_filter(self.ctx)
        if output_filter is None:
            return FilterStep(text, False)
        return output_filter.filter_all(text)

    def stream_filter(self) -> StreamFilter:
        return StreamFilter(self.guard.output_filter(self.ctx))

    def choice_filters(self, num_choices: int) -> ChoiceFilters:
        return ChoiceFilters(self, num_choices)


class NullGuardSession:
    """No policy: nothing is checked or charged, text passes through unchanged."""

    active = False
    has_classifier = False
    has_output_rails = False
    key = None
    admitted = False

    def __init__(self, ctx: RequestContext) -> None:
        self.ctx = ctx

    @property
    def request_id(self) -> str | None:
        return self.ctx.request_id

    def authenticate(self, authorization: str | None) -> None:
        pass

    def use_key(self, key: KeyPolicy | None) -> None:
        pass

    def admit(self, model: str) -> None:
        pass

    def reserve(self, prompt_tokens: int, max_tokens: int) -> None:
        pass

    def release(self, prompt_tokens: int, completion_tokens: int) -> None:
        pass

    def check_input(self, texts: list[str], param: str = "messages", conversation: bool | None = None) -> list[str]:
        return texts

    def check_prompt_tokens(self, num_tokens: int, param: str = "messages") -> None:
        pass

    async def classify(self, conversations: list[list[dict]], param: str = "messages") -> None:
        pass

    def filter_whole(self, text: str) -> FilterStep:
        return FilterStep(text, False)

    def stream_filter(self) -> StreamFilter:
        return StreamFilter(None)

    def choice_filters(self, num_choices: int) -> ChoiceFilters:
        return ChoiceFilters(self, num_choices)


class GuardMetricsObserver:
    """Guard decisions and rail latencies into a process's metrics (`serval:guard_decisions`,
    `serval:guard_latency_seconds`), and, with an OpenTelemetry tracer, a span per rail under the request's span
    (the session's `trace`). Register with `guard.observers.append(...)`."""

    def __init__(self, decisions, latency, tracer=None) -> None:
        self.decisions = decisions   # a prometheus Counter labelled (rail, action)
        self.latency_seconds = latency   # a prometheus Histogram labelled (rail,)
        self.tracer = tracer         # an opentelemetry.trace.Tracer, or None

    def decision(self, decision: Decision, ctx: RequestContext) -> None:
        self.decisions.labels(decision.rail, decision.action).inc()

    def latency(self, rail: str, seconds: float, ctx: RequestContext) -> None:
        self.latency_seconds.labels(rail).observe(seconds)
        if self.tracer is not None and ctx.trace is not None:
            from opentelemetry import trace  # only a process that traces has it loaded
            end = time.time_ns()
            span = self.tracer.start_span(f"guard {rail}", context=trace.set_span_in_context(ctx.trace),
                                          start_time=end - int(seconds * 1e9), attributes={"serval.guard.rail": rail})
            span.end(end_time=end)
