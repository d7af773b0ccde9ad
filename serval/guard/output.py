"""Output rails, streaming-safe: PII and deny patterns applied to generated text as it streams.

Each choice gets an OutputFilter. `push(delta)` returns the text that is safe to send now; it holds back only
from the earliest place where a match could still be forming (a partial regex match at the tail, or a full
match that touches the tail and could still grow), so a secret split across chunks is caught whole, and text
ahead of it flows without delay. `finish()` releases the rest once the choice has ended.

Actions: redact (replace with [REDACTED:<category>]), stop (send the text before the match, then end the
choice with finish_reason "content_filter"), log (send unchanged, record the decision).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

from serval.guard.decisions import Decision
from serval.guard.pii import Span, find_pattern, find_pii, placeholder
from serval.guard.policy import Policy

# A runaway partial match (a deny pattern like "a.*b" on text with no b) must not hold text forever.
MAX_HOLDBACK_CHARS = 4096


class FilterStep(NamedTuple):
    """A named pair, so callers may unpack it: `text, stopped = filter.push(delta)`."""
    text: str       # safe to send now
    stopped: bool   # a 'stop' rail fired: send text, then end the choice with finish_reason "content_filter"


class OutputFilter:
    def __init__(self, policy: Policy, record: Callable[[Decision], None],
                 observe_latency: Callable[[str, float], None]) -> None:
        self.policy = policy
        self.record = record
        self.observe_latency = observe_latency
        self.buffer = ""
        self.stopped = False
        self._pii_types = tuple(t for rule in policy.output_pii for t in rule.types)

    def push(self, text: str) -> FilterStep:
        if self.stopped:
            return FilterStep("", True)
        self.buffer += text
        return self._release(final=len(self.buffer) > MAX_HOLDBACK_CHARS)

    def finish(self) -> FilterStep:
        if self.stopped:
            return FilterStep("", True)
        return self._release(final=True)

    def filter_all(self, text: str) -> FilterStep:
        """A whole (non-streamed) output."""
        first = self.push(text)
        if first.stopped:
            return first
        last = self.finish()
        return FilterStep(first.text + last.text, last.stopped)

    def _release(self, final: bool) -> FilterStep:
        buffer = self.buffer
        spans = self._spans(buffer, partial=not final)
        hold = len(buffer) if final else _hold_point(spans, len(buffer))
        pieces, position = [], 0
        for span in _non_overlapping([s for s in spans if not s.partial and s.end <= hold]):
            action = self._action(span.category)
            rail = "output_pii" if not span.category.startswith("deny:") else "output_deny"
            self.record(Decision(rail, action, span.category))
            if action == "log":
                continue
            pieces.append(buffer[position:span.start])
            position = span.end
            if action == "stop":
                self.stopped, self.buffer = True, ""
                return FilterStep("".join(pieces), True)
            pieces.append(placeholder(span.category))
        pieces.append(buffer[position:hold])
        self.buffer = buffer[hold:]
        return FilterStep("".join(pieces), False)

    def _spans(self, text: str, partial: bool) -> list[Span]:
        spans: list[Span] = []
        if self.policy.output_deny:
            started = time.perf_counter()
            for rule in self.policy.output_deny:
                spans.extend(find_pattern(rule.compiled, f"deny:{rule.name}", text, partial))
            self.observe_latency("output_deny", time.perf_counter() - started)
        if self.policy.output_pii:
            started = time.perf_counter()
            spans.extend(find_pii(text, self._pii_types, partial))
            self.observe_latency("output_pii", time.perf_counter() - started)
        return spans

    def _action(self, category: str) -> str:
        if category.startswith("deny:"):
            name = category[len("deny:"):]
            return next(rule.action for rule in self.policy.output_deny if rule.name == name)
        return next(rule.action for rule in self.policy.output_pii if category in rule.types)


def _hold_point(spans: list[Span], length: int) -> int:
    """Where text must stop being released: the start of the earliest match still forming, widened until no
    complete match straddles it."""
    hold = min((s.start for s in spans if s.partial or s.end >= length), default=length)
    changed = True
    while changed:
        changed = False
        for span in spans:
            if span.start < hold < span.end:
                hold, changed = span.start, True
    return hold


def _non_overlapping(spans: list[Span]) -> list[Span]:
    """Earliest first, longest on ties; a span overlapping a kept one is dropped."""
    kept: list[Span] = []
    for span in sorted(spans, key=lambda s: (s.start, -(s.end - s.start))):
        if not kept or span.start >= kept[-1].end:
            kept.append(span)
    return kept
