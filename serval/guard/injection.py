"""Prompt-injection heuristic: weighted phrase patterns ("ignore previous instructions" and its variants),
combined as independent evidence: score = 1 - prod(1 - weight of each pattern that matched), in [0, 1).

A heuristic, not a classifier: it catches the copy-pasted attacks that make up most injection attempts, and
its score threshold trades false positives for recall. The text is normalized first (serval.guard.normalize:
NFKC, invisible characters removed, look-alikes mapped to Latin, case folded; then punctuation to spaces) so
"I.g.n.o.r.e" style spacing tricks and Cyrillic look-alikes still match.
"""
from __future__ import annotations

import regex

from serval.guard.normalize import normalize as normalize_text

_PRIOR = (r"(?:all |any |the |your |these |those |my )*"
          r"(?:previous|prior|above|earlier|preceding|former|original|initial|system)")
_RULES = r"(?:instructions?|prompts?|messages?|rules|directions|guidelines|context|commands?|constraints)"
PATTERNS: list[tuple[str, float]] = [
    (rf"\b(?:ignore|disregard|forget|skip|bypass|override|neglect) {_PRIOR} {_RULES}\b", 0.9),
    (r"\b(?:ignore|disregard|forget) (?:everything|all|anything) (?:you were|you ve been|that was|i) "
     r"(?:told|said|given)\b", 0.8),
    (rf"\b(?:ignore|disregard|forget|override) (?:your|the|all) (?:safety |content )?{_RULES}\b", 0.7),
    (r"\byou are (?:now )?(?:dan|in developer mode|jailbroken|unrestricted|unfiltered|no longer bound)\b", 0.8),
    (r"\bdo anything now\b", 0.6),
    (r"\b(?:developer|god|admin|sudo) mode (?:enabled|on|activated)\b", 0.6),
    (r"\b(?:reveal|print|show|repeat|output|leak|tell me) (?:me )?(?:your|the) (?:system prompt|hidden "
     r"(?:instructions|prompt)|initial (?:instructions|prompt)|original instructions)\b", 0.8),
    (r"\bpretend (?:you are|to be|that you) .{0,40}(?:without|no|free of) (?:any )?"
     r"(?:restrictions|rules|filters|limits)\b", 0.6),
    (r"\bact as (?:an? )?(?:unfiltered|uncensored|unrestricted|evil)\b", 0.6),
    (r"\bnew (?:instructions|rules|system prompt)\b", 0.4),
    (r"\bfrom now on you (?:will|must|are)\b", 0.3),
    (r"\bjailbreak\b", 0.4),
]
_COMPILED = [(regex.compile(p), w) for p, w in PATTERNS]


def normalize(text: str) -> str:
    text = normalize_text(text)
    text = regex.sub(r"(?<=\b\w)[.\-_*](?=\w\b)", "", text)  # i.g.n.o.r.e → ignore
    return " ".join(regex.sub(r"[^\w]+", " ", text).split())


def injection_score(text: str) -> float:
    normalized = normalize(text)
    keep = 1.0
    for pattern, weight in _COMPILED:
        if pattern.search(normalized):
            keep *= 1.0 - weight
    return 1.0 - keep
