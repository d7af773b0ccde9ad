"""Input rails: deny patterns, the prompt-injection heuristic and PII, applied to the prompt's texts before the
model sees them. Each rail returns the (possibly redacted) texts and its decisions, or raises GuardRejection
(400, naming the rail and what kind of thing matched, never echoing it).

Deny patterns and the injection heuristic read normalised text (serval.guard.normalize: NFKC, invisible
characters removed, look-alikes mapped to Latin, case folded, whitespace collapsed), each message alone and the
messages joined by a space, so neither spelling tricks nor a phrase split across two messages gets past them."""
from __future__ import annotations

from serval.guard.decisions import Decision, GuardRejection
from serval.guard.injection import injection_score
from serval.guard.normalize import normalize
from serval.guard.pii import find_pii, redact
from serval.guard.policy import DenyRule, InjectionRule, PiiRule


def deny_rail(texts: list[str], rules: tuple[DenyRule, ...], param: str, joined: bool = True) -> list[Decision]:
    decisions = []
    readings = _readings(texts, joined)
    for rule in rules:
        if any(rule.compiled.search(text) for text in readings):
            decisions.append(Decision("input_deny", rule.action, f"deny:{rule.name}"))
            if rule.action == "block":
                raise _blocked("input_deny", f"the deny rule {rule.name!r} matched", param, decisions)
    return decisions


def injection_rail(texts: list[str], rule: InjectionRule, param: str, joined: bool = True) -> list[Decision]:
    score = max((injection_score(text) for text in _readings(texts, joined)), default=0.0)
    if score < rule.threshold:
        return []
    decisions = [Decision("injection", rule.action, "injection", score)]
    if rule.action == "block":
        raise _blocked("injection", f"it looks like a prompt injection (score {score:.2f}, threshold "
                                    f"{rule.threshold})", param, decisions)
    return decisions


def pii_rail(texts: list[str], rules: tuple[PiiRule, ...], param: str) -> tuple[list[str], list[Decision]]:
    types = tuple(t for rule in rules for t in rule.types)
    found = [find_pii(text, types) for text in texts]
    categories = sorted({span.category for spans in found for span in spans})
    action_of = {t: rule.action for rule in rules for t in rule.types}
    decisions = [Decision("input_pii", action_of[category], category) for category in categories]
    blocked = [category for category in categories if action_of[category] == "block"]
    if blocked:
        raise _blocked("input_pii", f"it contains {', '.join(blocked)}", param, decisions)
    redacted = [[span for span in spans if action_of[span.category] == "redact"] for spans in found]
    texts = [redact(text, spans) if spans else text for text, spans in zip(texts, redacted)]
    return texts, decisions


def _readings(texts: list[str], joined: bool) -> list[str]:
    """Each text normalised, and, for one conversation, all of them joined (a phrase split across messages)."""
    normalised = [normalize(text) for text in texts]
    return normalised + [normalize(" ".join(texts))] if joined and len(texts) > 1 else normalised


def _blocked(rail: str, why: str, param: str, decisions: list[Decision]) -> GuardRejection:
    rejection = GuardRejection(400, f"The request was blocked by the input rail {rail!r}: {why}.",
                               "content_policy_violation", rail=rail, param=param)
    rejection.decisions = decisions
    return rejection
