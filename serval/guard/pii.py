"""PII and secret detection: regular expressions, each with a checksum or plausibility check where one exists
(Luhn for card numbers, ISO 7064 mod 97 for IBANs, Shannon entropy for unnamed secrets).

Patterns use the `regex` module for its partial matching: the output rails' stream filter (serval.guard.output)
asks "could a match starting here still run on through the text to come?" and holds back only from there.
"""
from __future__ import annotations

import ipaddress
import math
from collections import Counter
from dataclasses import dataclass

import regex

from serval.guard.normalize import visible_with_offsets

PII_TYPES = ("email", "phone", "credit_card", "iban", "ssn", "ip_address", "secret")

# Known credential formats: prefix + body. Listed by vendor so a reader can check each against its docs.
_SECRET_FORMATS = [
    r"sk-(?:proj-|ant-|svcacct-)?[A-Za-z0-9_\-]{20,200}",  # OpenAI, Anthropic
    r"gh[pousr]_[A-Za-z0-9]{36,255}",                   # GitHub tokens
    r"github_pat_[A-Za-z0-9_]{22,255}",                 # GitHub fine-grained tokens
    r"(?:AKIA|ASIA)[0-9A-Z]{16}",                       # AWS access key ids
    r"xox[abprs]-[A-Za-z0-9\-]{10,200}",                # Slack
    r"AIza[0-9A-Za-z_\-]{35}",                          # Google API keys
    r"glpat-[A-Za-z0-9_\-]{20,100}",                    # GitLab
    r"(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{24,200}",     # Stripe
    r"hf_[A-Za-z0-9]{30,100}",                          # Hugging Face
    r"eyJ[A-Za-z0-9_\-]{8,2000}\.eyJ[A-Za-z0-9_\-]{8,2000}\.[A-Za-z0-9_\-]{8,2000}",  # JWTs
    r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----",         # PEM private keys
]
# Unnamed secrets: long runs of key-like characters with high entropy and both letters and digits. The bounds keep
# English words and identifiers out (an English word of 24+ letters has no digits; hex hashes of 32+ do match).
_ENTROPY_CANDIDATE = r"(?<![A-Za-z0-9+/_\-])[A-Za-z0-9+/_\-]{24,256}={0,2}(?![A-Za-z0-9+/_\-])"
MIN_SECRET_ENTROPY = 3.5  # bits per character

_PATTERNS = {
    "secret": regex.compile("|".join(f"(?:{p})" for p in _SECRET_FORMATS)),
    "secret_entropy": regex.compile(_ENTROPY_CANDIDATE),
    "credit_card": regex.compile(r"(?<![\d-])\d(?:[ \-]?\d){12,18}(?![\d-])"),
    "iban": regex.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])"),
    "ssn": regex.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])"),
    "email": regex.compile(r"(?<![\w.+\-])[A-Za-z0-9._%+\-]{1,64}@[A-Za-z0-9\-]{1,63}(?:\.[A-Za-z0-9\-]{1,63})*"
                           r"\.[A-Za-z]{2,24}(?![\w\-])"),
    "ip_address": regex.compile(r"(?<![\w.:])(?:(?:\d{1,3}\.){3}\d{1,3}|(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4})"
                                r"(?![\w:]|\.\d)"),
    "phone": regex.compile(r"(?<![\w+])(?:\+\d{1,3}[ .\-]?(?:\(?\d{1,4}\)?[ .\-]?){1,4}\d{2,4}"
                           r"|\(?\d{3}\)?[ .\-]\d{3}[ .\-]\d{4})(?![\w])"),
}
# Overlaps go to the earlier type: a card number is not also a phone number.
_ORDER = ("secret", "secret_entropy", "credit_card", "iban", "ssn", "email", "ip_address", "phone")


@dataclass(frozen=True)
class PiiPattern:
    """One detector: its regular expression and the check a complete match must pass."""
    name: str       # the pattern's own name (secret_entropy is a second detector of category secret)
    category: str   # the PII type it reports
    pattern: regex.Pattern

    def valid(self, value: str) -> bool:
        return _valid(self.name, value)


# In priority order: where two types' matches overlap, the earlier type's wins.
PII_PATTERNS = tuple(PiiPattern(name, "secret" if name == "secret_entropy" else name, _PATTERNS[name])
                     for name in _ORDER)


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    category: str  # a PII type


def find_pii(text: str, types: tuple[str, ...] = PII_TYPES) -> list[Span]:
    """Non-overlapping PII spans of a whole text, by start, in the text's own positions; where two types overlap,
    the earlier in PII_PATTERNS wins. The detectors read the text's visible form (NFKC, invisible characters
    removed), so full-width digits or a zero-width space between digit groups don't hide a card number."""
    visible, origin = visible_with_offsets(text)
    spans: list[Span] = []
    for detector in PII_PATTERNS:
        if detector.category not in types:
            continue
        for match in detector.pattern.finditer(visible):
            if match.start() == match.end() or not detector.valid(match.group()):
                continue
            span = Span(origin[match.start()], origin[match.end() - 1] + 1, detector.category)
            if not any(span.start < other.end and other.start < span.end for other in spans):
                spans.append(span)
    return sorted(spans, key=lambda s: s.start)


def redact(text: str, spans: list[Span]) -> str:
    """Each span replaced by [REDACTED:<category>]; spans must not overlap."""
    pieces, position = [], 0
    for span in sorted(spans, key=lambda s: s.start):
        pieces.append(text[position:span.start])
        pieces.append(placeholder(span.category))
        position = span.end
    pieces.append(text[position:])
    return "".join(pieces)


def placeholder(category: str) -> str:
    return f"[REDACTED:{category}]"


def _valid(name: str, value: str) -> bool:
    if name == "credit_card":
        return luhn_valid("".join(c for c in value if c.isdigit()))
    if name == "iban":
        return iban_valid(value)
    if name == "ip_address":
        try:
            ipaddress.ip_address(value)
        except ValueError:
            return False
        return True
    if name == "secret_entropy":
        return (any(c.isdigit() for c in value) and any(c.isalpha() for c in value)
                and shannon_entropy(value) >= MIN_SECRET_ENTROPY)
    if name == "phone":
        return 9 <= sum(c.isdigit() for c in value) <= 15
    return True


def luhn_valid(digits: str) -> bool:
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for position, char in enumerate(reversed(digits)):
        digit = int(char)
        if position % 2 == 1:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def iban_valid(value: str) -> bool:
    compact = value.replace(" ", "").upper()
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def shannon_entropy(value: str) -> float:
    counts = Counter(value)
    return -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())
