"""The text the deny and injection rails match: what a reader sees, not how it was typed.

`normalize(text)`: Unicode NFKC (full-width and mathematical letters become ASCII), invisible characters removed
(format characters such as zero-width spaces and joiners, soft hyphens and bidi controls; variation selectors;
the combining grapheme joiner; Hangul fillers; control characters), look-alikes from other scripts mapped to the
Latin letter or digit they imitate (Unicode's confusables, serval.guard.confusables), case folded, and every run
of whitespace collapsed to one space. So "build  a bomb", "bu\u200bild a bomb", "build а bomb" (Cyrillic а) and
"ｂｕｉｌｄ a bomb" all read "build a bomb".

`visible_with_offsets(text)` is the lighter form PII detection reads: NFKC and invisible characters removed.

`normalize_with_offsets(text)` does the same as `normalize` character by character and says, for each character of the result,
which character of the input it came from, so the output rails can find a match in normalised text and redact
the original characters. Character by character, NFKC cannot compose a base letter with a following combining
mark; the output rails accept that to keep a streamed answer's normalisation equal to the whole answer's.
"""
from __future__ import annotations

import re
import unicodedata

import regex

from serval.guard.confusables import SKELETON

# Besides format characters (category Cf: zero-width space and joiners, soft hyphen, bidi controls, tags) and
# control characters other than whitespace: variation selectors, the combining grapheme joiner, Hangul fillers,
# Khmer inherent vowels and Mongolian free variation selectors.
_INVISIBLE_RANGES = ((0xFE00, 0xFE0F), (0xE0100, 0xE01EF), (0x180B, 0x180F), (0x034F, 0x034F), (0x115F, 0x1160),
                     (0x3164, 0x3164), (0xFFA0, 0xFFA0), (0x17B4, 0x17B5))
# Where format and control characters are: the Basic and Supplementary Multilingual Planes and the tags block.
_SCANNED_PLANES = ((0x0000, 0x1FFFF), (0xE0000, 0xE0FFF))
# The standard library's \s is str.isspace's whitespace. A lone space is left alone: most text is words and spaces.
_WHITESPACE = re.compile(r"\s{2,}|[^\S ]")


def _build_tables() -> tuple[dict[int, str], dict[int, str | None]]:
    """(before case folding, after it; the second also deletes invisible characters). A look-alike whose lower
    case is a look-alike too maps after folding (Greek capital iota → ι → i, though confusables.txt pairs the
    capital with l); the rest, whose lower case looks like nothing Latin (Cyrillic В, Н, М), map before folding."""
    before = {ord(char): ascii_char for char, ascii_char in SKELETON.items()
              if len(char.casefold()) != 1 or char.casefold() not in SKELETON}
    after: dict[int, str | None] = {ord(char): ascii_char.casefold() for char, ascii_char in SKELETON.items()}
    for low, high in _SCANNED_PLANES:
        for code in range(low, high + 1):
            category = unicodedata.category(chr(code))
            if category == "Cf" or (category == "Cc" and not chr(code).isspace()):
                after[code] = None
    for low, high in _INVISIBLE_RANGES:
        after.update(dict.fromkeys(range(low, high + 1)))
    return before, after


_BEFORE_FOLDING, _AFTER_FOLDING = _build_tables()
_INVISIBLE = {code: None for code, replacement in _AFTER_FOLDING.items() if replacement is None}
_ASCII_CONTROLS = re.compile(r"[\x00-\x08\x0e-\x1b\x7f]")


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).translate(_BEFORE_FOLDING).casefold().translate(_AFTER_FOLDING)
    return _WHITESPACE.sub(" ", text)


def normalize_char(char: str) -> str:
    """One character's normal form (possibly empty, or several characters), whitespace not yet collapsed."""
    return unicodedata.normalize("NFKC", char).translate(_BEFORE_FOLDING).casefold().translate(_AFTER_FOLDING)


def normalize_with_offsets(text: str, previous: str = "") -> tuple[str, list[int]]:
    """(normalised text, for each of its characters the index in `text` it came from). `previous` is the
    normalised character before `text` (where a stream resumes), so that whitespace collapses across the seam."""
    out: list[str] = []
    offsets: list[int] = []
    last_space = previous == " "
    for index, char in enumerate(text):
        for piece in normalize_char(char):
            if piece.isspace():
                if last_space:
                    continue
                piece, last_space = " ", True
            else:
                last_space = False
            out.append(piece)
            offsets.append(index)
    return "".join(out), offsets


def visible_with_offsets(text: str) -> tuple[str, list[int]]:
    """What PII detection reads: each character's NFKC form (full-width digits and @ become ASCII) with invisible
    characters removed ("4111<U+200B>1111..." is a card number), and where each character came from. Case,
    scripts and whitespace are kept: IBANs and key prefixes are case-sensitive, and spaces separate a card's
    digit groups."""
    if text.isascii() and not _ASCII_CONTROLS.search(text):
        return text, list(range(len(text)))
    out: list[str] = []
    offsets: list[int] = []
    for index, char in enumerate(text):
        for piece in unicodedata.normalize("NFKC", char).translate(_INVISIBLE):
            out.append(piece)
            offsets.append(index)
    return "".join(out), offsets


def normalize_pattern(pattern: str) -> str:
    """A deny pattern rewritten to match normalised text: each non-ASCII letter or digit replaced by the normal
    forms of its lower and upper case (Cyrillic в stays в but В reads as Latin b, so "взрыв" must match both),
    so a word in another script still matches that word in any case. ASCII, the regular-expression syntax, is
    left as written."""
    out, in_class, escaped = [], False, False
    for char in pattern:
        if escaped or char.isascii() or not char.isalnum():
            out.append(char)
            if not escaped and char == "\\":
                escaped = True
                continue
            if not escaped and char in "[]":
                in_class = char == "["
            escaped = False
            continue
        forms = sorted({form for form in (normalize_char(char.lower()), normalize_char(char.upper()),
                                          normalize_char(char)) if form})
        if in_class:
            out.append("".join(regex.escape(form) for form in forms if len(form) == 1) or char)
        elif len(forms) == 1:
            out.append(regex.escape(forms[0]))
        else:
            out.append("(?:" + "|".join(regex.escape(form) for form in forms) + ")")
    return "".join(out)
