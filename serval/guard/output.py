"""Output rails, streaming-safe: PII and deny patterns applied to generated text as it streams.

Each choice gets an OutputFilter. `push(delta)` returns the text that is safe to send now, `finish()` the rest
once the choice has ended, and `filter_all(text)` is the two at once (a whole answer). The promise: however the
answer is split into deltas, the text streamed equals the text of the whole answer filtered at once.

What keeps that promise is how much is held back. Text is released up to the earliest position from which some
detector's regular expression could still match through the end of the text so far (`fullmatch(..., partial=
True)` from that position: a match still forming, or a complete match that more text could lengthen or change,
valid or not yet valid, such as "4111 1111 1111 111" one digit short of a Luhn-valid card number), pulled back
further while any decided match (valid or not) straddles it. Before that point every detector's matches are
decided, so they are acted on exactly as the whole answer's would be; the next push resumes every detector's
scan at that point, with the released text kept before it as context for lookbehinds:

    released (context) | decided: acted on, released now | held: could still match | <- next delta

PII detectors read the answer's visible form and deny rules its normalised form (serval.guard.normalize,
character by character, with each character's origin in the answer); the original characters of a match are
what is redacted, invisible ones inside it included.

Actions: redact (replace with [REDACTED:<category>]), stop (send the text before the match, then end the
choice with finish_reason "content_filter"), log (send unchanged, record the decision).
"""
from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import regex

from serval.guard.decisions import Decision
from serval.guard.normalize import normalize_with_offsets, visible_with_offsets
from serval.guard.pii import PII_PATTERNS, placeholder
from serval.guard.policy import Policy

# A runaway forming match (a deny pattern like "a.*b" on text with no b) must not hold text forever. Above the
# longest PII match (a JWT, about 6,000 characters), so the streaming promise holds for every PII type.
MAX_HOLDBACK_CHARS = 8192
# Released text kept before the held text, for lookbehinds and word boundaries at the seam.
CONTEXT_CHARS = 256


class FilterStep(NamedTuple):
    """A named pair, so callers may unpack it: `text, stopped = filter.push(delta)`."""
    text: str       # safe to send now
    stopped: bool   # a 'stop' rail fired: send text, then end the choice with finish_reason "content_filter"


@dataclass(frozen=True)
class Detector:
    """One regular expression the output rails look for, and what a complete match of it means."""
    category: str              # a PII type, or 'deny:<rule name>'
    rail: str                  # output_pii or output_deny
    action: str                # redact, stop or log
    pattern: regex.Pattern
    valid: Callable[[str], bool]
    normalised: bool           # reads normalised text (deny rules), or the visible text (PII)
    priority: int              # PII overlaps go to the lower; deny rules come after every PII type


@dataclass(frozen=True)
class Match:
    start: int                 # in the filter's text
    end: int
    detector: Detector
    valid: bool


def detectors(policy: Policy) -> tuple[Detector, ...]:
    pii_action = {pii_type: rule.action for rule in policy.output_pii for pii_type in rule.types}
    found = [Detector(p.category, "output_pii", pii_action[p.category], p.pattern, p.valid, False, priority)
             for priority, p in enumerate(PII_PATTERNS) if p.category in pii_action]
    found += [Detector(f"deny:{rule.name}", "output_deny", rule.action, rule.compiled, _always, True,
                       len(PII_PATTERNS)) for rule in policy.output_deny]
    return tuple(found)


class _Reading:
    """The answer as one kind of detector reads it (visible or normalised), kept in step with the filter's text
    as it grows and is trimmed, so each character is normalised once; `origin[i]` is the answer position its
    character i came from."""

    def __init__(self, normalised: bool) -> None:
        self.read = normalize_with_offsets if normalised else _visible
        self.text = ""
        self.origin: list[int] = []

    def append(self, text: str, base: int) -> None:
        read, origin = self.read(text, self.text[-1:])
        self.text += read
        self.origin.extend(base + index for index in origin)

    def trim(self, offset: int) -> None:
        """Forget what came from answer positions before `offset`."""
        drop = bisect.bisect_left(self.origin, offset)
        self.text, self.origin = self.text[drop:], self.origin[drop:]

    def index(self, position: int) -> int:
        """The first character read at or after answer position `position`."""
        return bisect.bisect_left(self.origin, position)

    def position(self, index: int, end: int) -> int:
        """The answer position character `index` came from (`end` past the last)."""
        return self.origin[index] if index < len(self.origin) else end

    def span(self, start: int, end: int) -> tuple[int, int]:
        return self.origin[start], self.origin[end - 1] + 1


class OutputFilter:
    def __init__(self, policy: Policy, record: Callable[[Decision], None],
                 observe_latency: Callable[[str, float], None]) -> None:
        self.policy = policy
        self.record = record
        self.observe_latency = observe_latency
        self.detectors = detectors(policy)
        self.text = ""        # released context, then the held text
        self.start = 0        # where the held text begins in self.text
        self.offset = 0       # how many characters of the answer come before self.text
        # Per detector, the answer position before which no position can start a match any more (checked).
        self.decided = [0] * len(self.detectors)
        self.readings = {normalised: _Reading(normalised)
                         for normalised in {detector.normalised for detector in self.detectors}}
        self.stopped = False

    @property
    def buffer(self) -> str:
        """The text held back so far."""
        return self.text[self.start:]

    def push(self, text: str) -> FilterStep:
        if self.stopped:
            return FilterStep("", True)
        self._append(text)
        return self._release(final=len(self.text) - self.start > MAX_HOLDBACK_CHARS)

    def finish(self) -> FilterStep:
        if self.stopped:
            return FilterStep("", True)
        return self._release(final=True)

    def filter_all(self, text: str) -> FilterStep:
        """A whole (non-streamed) output, in one final pass."""
        if self.stopped:
            return FilterStep("", True)
        self._append(text)
        return self._release(final=True)

    def _append(self, text: str) -> None:
        for reading in self.readings.values():
            reading.append(text, self.offset + len(self.text))
        self.text += text

    def _release(self, final: bool) -> FilterStep:
        text, start = self.text, self.start
        matches, hold = self._scan(text, start, final)
        decided = [m for m in matches if m.start < hold]
        # No decided match may straddle the release point: every detector resumes its scan there.
        changed = True
        while changed:
            changed = False
            for match in decided:
                if match.start < hold < match.end:
                    hold, changed = match.start, True
        pieces, position = [], start
        for match in _resolve([m for m in decided if m.valid and m.end <= hold]):
            detector = match.detector
            self.record(Decision(detector.rail, detector.action, detector.category))
            if detector.action == "log":
                continue
            pieces.append(text[position:match.start])
            position = match.end
            if detector.action == "stop":
                self.stopped, self.text, self.start, self.readings = True, "", 0, {}
                return FilterStep("".join(pieces), True)
            pieces.append(placeholder(detector.category))
        pieces.append(text[position:hold])
        keep_from = max(0, hold - CONTEXT_CHARS)
        self.text, self.start, self.offset = text[keep_from:], hold - keep_from, self.offset + keep_from
        for reading in self.readings.values():
            reading.trim(self.offset)
        return FilterStep("".join(pieces), False)

    def _scan(self, text: str, start: int, final: bool) -> tuple[list[Match], int]:
        """Every detector's matches from `start`, and the earliest position a match could still be forming at
        (the length of the text when final); positions in the filter's text."""
        hold = len(text)
        matches: list[Match] = []
        timings: dict[str, float] = {}
        for number, detector in enumerate(self.detectors):
            started = time.perf_counter()
            reading = self.readings[detector.normalised]
            if not final:
                # Positions already found unable to reach the end stay so, whatever text comes.
                begin = reading.index(max(self.offset + start, self.decided[number]))
                forming = _first_forming(detector.pattern, reading.text, begin)
                self.decided[number] = reading.position(forming, self.offset + len(text))
                hold = min(hold, self.decided[number] - self.offset)
            for found in detector.pattern.finditer(reading.text, reading.index(self.offset + start)):
                if found.end() == found.start():
                    continue
                match_start, match_end = reading.span(found.start(), found.end())
                matches.append(Match(match_start - self.offset, match_end - self.offset, detector,
                                     detector.valid(found.group())))
            timings[detector.rail] = timings.get(detector.rail, 0.0) + time.perf_counter() - started
        for rail, seconds in timings.items():
            self.observe_latency(rail, seconds)
        return matches, hold


def _first_forming(pattern: regex.Pattern, text: str, begin: int) -> int:
    """The first position from `begin` at which a match could run through the end of the text (and so is not
    decided yet); len(text) when there is none. A complete match ending before the end is decided only if no
    way of matching from its start reaches the end: `a(?:bc)?` on "ab" matches "a" now and "abc" later."""
    for position in range(begin, len(text)):
        if pattern.fullmatch(text, position, partial=True) is not None:
            return position
    return len(text)


def _resolve(matches: list[Match]) -> list[Match]:
    """The matches to act on, by start: PII types in priority order, a match overlapping one already kept
    dropped (a card number is not also a phone number); then deny matches; earliest first, longest on ties."""
    kept: list[Match] = []
    for match in sorted(matches, key=lambda m: (m.detector.priority, m.start)):
        if match.detector.rail == "output_deny" or not any(
                match.start < other.end and other.start < match.end for other in kept):
            kept.append(match)
    chosen: list[Match] = []
    for match in sorted(kept, key=lambda m: (m.start, -(m.end - m.start))):
        if not chosen or match.start >= chosen[-1].end:
            chosen.append(match)
    return chosen


def _always(_: str) -> bool:
    return True


def _visible(text: str, previous: str) -> tuple[str, list[int]]:
    return visible_with_offsets(text)
