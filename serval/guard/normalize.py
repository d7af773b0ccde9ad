"""The text the deny and injection rails match: what a reader sees, not how it was typed.

`normalize(text)`: Unicode NFKC (full-width and mathematical letters become ASCII), invisible characters removed
(format characters such as zero-width spaces and joiners, soft hyphens and bidi controls; variation selectors;
the combining grapheme joiner; Hangul fillers; control characters), look-alikes from other scripts mapped to the
Latin letter or digit they imitate (Unicode's confusables, serval.guard.confusables), case folded, and every run
of whitespace collapsed to one space. So "build  a bomb", "bu\u200bild a bomb", "build а bomb" (Cyrillic а) and
"ｂｕｉｌｄ a bomb" all read "build a bomb".

`normalize_with_offsets(text)` does the same character by character and says, for each character of the result,
which character of the input it came from, so the output rails can find a match in normalised text and redact
the original characters. Character by character, NFKC cannot compose a base letter with a following combining
mark; the output rails accept that to keep a streamed answer's normalisation equal to the whole answer's.
"""
from __future__ import annotations

import unicodedata

import regex

from serval.guard.confusables import SKELETON

# Format characters (zero-width space and joiners, soft hyphen, bidi controls, tags), control characters other
# than whitespace, variation selectors, the combining grapheme joiner, Hangul fillers and Khmer inherent vowels.
_INVISIBLE = regex.compile(r"[[\p{Cf}\p{Cc}\uFE00-\uFE0F\U000E0100-\U000E01EF\u180B-\u180F\u034F\u115F\u1160"
                           r"\u3164\uFFA0\u17B4\u17B5]--[\t\n\v\f\r\x1c-\x1f\x85]]", regex.V1)
_WHITESPACE = regex.compile(r"\s+")


def _build_tables() -> tuple[dict[int, str], dict[int, str]]:
    """(before case folding, after it). A look-alike whose lower case is a look-alike too maps after folding (Greek
    capital iota → ι → i, though confusables.txt pairs the capital with l); the rest, whose lower case looks like
    nothing Latin (Cyrillic В, Н, М), map before folding."""
    before = {ord(char): ascii_char for char, ascii_char in SKELETON.items()
              if len(char.casefold()) != 1 or char.casefold() not in SKELETON}
    after = {ord(char): ascii_char.casefold() for char, ascii_char in SKELETON.items()}
    return before, after


_BEFORE_FOLDING, _AFTER_FOLDING = _build_tables()


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).translate(_BEFORE_FOLDING).casefold().translate(_AFTER_FOLDING)
    return _WHITESPACE.sub(" ", _INVISIBLE.sub("", text))


def normalize_char(char: str) -> str:
    """One character's normal form (possibly empty, or several characters), whitespace not yet collapsed."""
    text = unicodedata.normalize("NFKC", char).translate(_BEFORE_FOLDING).casefold().translate(_AFTER_FOLDING)
    return _INVISIBLE.sub("", text)


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
