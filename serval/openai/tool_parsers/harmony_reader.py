"""Reading OpenAI's harmony format (gpt-oss) as it streams: the output is a run of messages,

    <|channel|>analysis<|message|>thinking...<|end|>
    <|start|>assistant<|channel|>commentary to=functions.weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>
    <|start|>assistant<|channel|>final<|message|>The answer.<|return|>

the first without `<|start|>assistant` (the chat template ends the prompt with it). `HarmonyReader.feed(text)`
turns text deltas into events (a message opens with its header, body text, the message closes). A header is only
read once whole (at `<|message|>`), and body text that might be the start of a marker is held back until the next
delta decides it, so no marker leaks into a body. Text that opens with no header is a body without a channel.

Each message is of one kind, the way vLLM serves gpt-oss: a `to=functions.NAME` recipient is a call (its body the
arguments), the analysis channel and messages to built-in tools (`to=python`, `to=browser...`) are reasoning,
the rest (final, commentary without recipient: preambles meant for the user) is content. Bodies of several
messages of one kind are joined with a newline, as vLLM's `parse_chat_output` joins them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
CONSTRAIN, RETURN, CALL = "<|constrain|>", "<|return|>", "<|call|>"
SPECIAL_TOKENS = (START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL)
TURN_ENDS = (RETURN, CALL)  # the answer is done, or a call waits for its result
# a body ends at its end marker; `<|start|>` too, when the model forgot the end
_BODY_ENDS = (END, RETURN, CALL, START)
_LONGEST_END = max(len(marker) for marker in _BODY_ENDS)
_FUNCTIONS = "functions."


def _partial_end_length(text: str) -> int:
    """How much of the end of `text` could begin a body's end marker: only from its last "<", since each marker
    holds one "<", its first character (one search instead of one per marker and length: this runs per token)."""
    start = text.rfind("<", max(0, len(text) - _LONGEST_END + 1))
    if start < 0:
        return 0
    tail = text[start:]
    return len(tail) if any(marker.startswith(tail) for marker in _BODY_ENDS) else 0


@dataclass(frozen=True)
class Header:
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None

    @property
    def function_name(self) -> str | None:
        if self.recipient is not None and self.recipient.startswith(_FUNCTIONS):
            return self.recipient[len(_FUNCTIONS):]
        return None

    @property
    def kind(self) -> str:
        """One of "call", "reasoning", "content"."""
        if self.function_name is not None:
            return "call"
        if self.channel == "analysis" or self.recipient is not None:
            return "reasoning"
        return "content"


def parse_header(text: str) -> Header:
    """`assistant<|channel|>commentary to=functions.f <|constrain|>json`; the recipient may also follow the role
    (`assistant to=functions.f<|channel|>commentary json`), and the content type may be a bare word."""
    recipient = re.search(r"to=([^\s<]+)", text)
    constrain = re.search(re.escape(CONSTRAIN) + r"\s*([^\s<]+)", text)
    channel_part = text.split(CHANNEL, 1)[1] if CHANNEL in text else ""
    words = [word for word in re.split(r"\s+|<\|[a-z]+\|>", channel_part) if word and not word.startswith("to=")]
    content_type = constrain.group(1) if constrain else (words[1] if len(words) > 1 else None)
    return Header(channel=words[0] if words else None, recipient=recipient.group(1) if recipient else None,
                  content_type=content_type)


@dataclass
class Event:
    kind: str  # "open", "text" or "close"
    header: Header
    text: str = ""


class HarmonyReader:

    def __init__(self) -> None:
        self._buffer = ""
        self._state = "begin"  # begin | between | header | body
        self._header = Header()
        self._kinds_with_text: set[str] = set()
        self._message_has_text = False

    def feed(self, text: str, final: bool = False) -> list[Event]:
        self._buffer += text
        events: list[Event] = []
        while self._step(final, events):
            pass
        if final:
            if self._state == "body":
                self._text(self._buffer, events)
                events.append(Event("close", self._header))
            self._buffer, self._state = "", "between"  # a header cut short is markup, not text
        return events

    def _step(self, final: bool, events: list[Event]) -> bool:
        if self._state in ("begin", "between"):
            # whitespace between messages is not content; at the very start it may be
            buffer = self._buffer.lstrip() if self._state == "between" else self._buffer
            if not buffer:
                self._buffer = buffer
                return False
            if buffer.startswith(START):
                self._buffer, self._state = buffer[len(START):], "header"
            elif buffer.startswith(CHANNEL):
                self._buffer, self._state = buffer, "header"
            elif not final and (START.startswith(buffer) or CHANNEL.startswith(buffer)):
                self._buffer = buffer
                return False
            else:  # text with no header
                self._buffer = buffer
                self._open(Header(), events)
            return True
        if self._state == "header":
            position = self._buffer.find(MESSAGE)
            if position < 0:
                return False
            self._open(parse_header(self._buffer[:position]), events)
            self._buffer = self._buffer[position + len(MESSAGE):]
            return True
        found = [(self._buffer.find(marker), marker) for marker in _BODY_ENDS]
        found = [item for item in found if item[0] >= 0]
        if not found:
            keep = 0 if final else _partial_end_length(self._buffer)
            self._text(self._buffer[:len(self._buffer) - keep], events)
            self._buffer = self._buffer[len(self._buffer) - keep:]
            return False
        position, marker = min(found)
        self._text(self._buffer[:position], events)
        events.append(Event("close", self._header))
        self._buffer = self._buffer[position + (0 if marker == START else len(marker)):]
        self._state = "between"
        return True

    def _open(self, header: Header, events: list[Event]) -> None:
        self._header, self._state, self._message_has_text = header, "body", False
        events.append(Event("open", header))

    def _text(self, text: str, events: list[Event]) -> None:
        if not text:
            return
        kind = self._header.kind
        if kind != "call" and not self._message_has_text and kind in self._kinds_with_text:
            text = "\n" + text
        self._kinds_with_text.add(kind)
        self._message_has_text = True
        events.append(Event("text", self._header, text))
