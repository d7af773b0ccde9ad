"""PROVISIONAL: the server's per-request view of the guard until serval/guard/session.py (branch `guard`) lands;
then this file goes and the handlers call that session instead. Same shape: a null session without a policy, so
the handlers call it unconditionally."""
from __future__ import annotations

import asyncio
import time

from serval.guard.guard import Guard, RequestContext
from serval.guard.output import FilterStep, OutputFilter
from serval.guard.policy import KeyPolicy


class GuardSession:
    """One request's guard: admission under its key, input rails, output rails, and the key's release (once)."""

    def __init__(self, guard: Guard, ctx: RequestContext, key: KeyPolicy | None) -> None:
        self.guard, self.ctx, self.key = guard, ctx, key
        self.admitted = False

    def admit(self, model: str) -> None:
        self.guard.admit(self.key, model, self.ctx)
        self.admitted = True

    def check_input(self, texts: list[str], param: str) -> list[str]:
        return self.guard.check_input(texts, self.ctx, param)

    def check_prompt_tokens(self, num_tokens: int, param: str) -> None:
        self.guard.check_prompt_tokens(num_tokens, self.ctx, param)

    async def classify(self, conversations: list[list[dict]], param: str) -> None:
        if self.guard.has_classifier:
            await asyncio.gather(*[self.guard.classify_input(c, self.ctx, param) for c in conversations])

    def filter_whole(self, text: str) -> FilterStep:
        output_filter = self.guard.output_filter(self.ctx)
        return FilterStep(text, False) if output_filter is None else output_filter.filter_all(text)

    def stream_filter(self) -> OutputFilter | None:
        return self.guard.output_filter(self.ctx)

    def release(self, prompt_tokens: int, completion_tokens: int) -> None:
        if self.admitted:
            self.admitted = False
            self.guard.release(self.key, prompt_tokens, completion_tokens)


class NullSession:
    """No policy: everything passes."""

    def __init__(self, ctx: RequestContext) -> None:
        self.ctx = ctx

    def admit(self, model: str) -> None:
        pass

    def check_input(self, texts: list[str], param: str) -> list[str]:
        return texts

    def check_prompt_tokens(self, num_tokens: int, param: str) -> None:
        pass

    async def classify(self, conversations: list[list[dict]], param: str) -> None:
        pass

    def filter_whole(self, text: str) -> FilterStep:
        return FilterStep(text, False)

    def stream_filter(self) -> None:
        return None

    def release(self, prompt_tokens: int, completion_tokens: int) -> None:
        pass


def open_session(guard: Guard | None, request_id: str, key: KeyPolicy | None, trace=None):
    ctx = RequestContext(request_id, key_id=key.id if key is not None else None, trace=trace)
    return NullSession(ctx) if guard is None else GuardSession(guard, ctx, key)


class GuardObserver:
    """Guard decisions and rail latencies into the server's metrics, and a span per rail under the request's."""

    def __init__(self, metrics, tracer) -> None:
        self.metrics, self.tracer = metrics, tracer

    def decision(self, decision, ctx: RequestContext) -> None:
        self.metrics.observe_guard_decision(decision.rail, decision.action)

    def latency(self, rail: str, seconds: float, ctx: RequestContext) -> None:
        self.metrics.observe_guard_latency(rail, seconds)
        if self.tracer is not None and ctx.trace is not None:
            from opentelemetry import trace
            end = time.time_ns()
            span = self.tracer.tracer.start_span(f"guard {rail}", context=trace.set_span_in_context(ctx.trace),
                                                 start_time=end - int(seconds * 1e9),
                                                 attributes={"serval.guard.rail": rail})
            span.end(end_time=end)
