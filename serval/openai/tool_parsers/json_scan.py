"""Incremental JSON reading, one character at a time, for streaming the arguments of JSON-format tool calls.

`JsonValueScanner` validates one JSON value as it arrives (RFC 8259, strictly), so an argument fragment is only
sent while it is still a valid JSON prefix. `JsonCallScanner` reads a call object `{"name": ..., "arguments":
{...}}` in any key order and reports the name once it is whole and the raw text of the arguments as it arrives;
the arguments a client receives are the model's own characters, so the streamed fragments and the whole-text
parse are equal by construction.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

WHITESPACE = " \t\n\r"
MORE, DONE, DONE_BEFORE, INVALID = "more", "done", "done_before", "invalid"  # DONE_BEFORE: char not part of value
_NUMBER_NEXT = {  # number sub-state -> (char class -> next sub-state); accepting states below
    "sign": {"zero": "zero", "digit": "int"}, "zero": {"dot": "frac0", "exp": "exp0"},
    "int": {"digit": "int", "zero": "int", "dot": "frac0", "exp": "exp0"}, "frac0": {"digit": "frac", "zero": "frac"},
    "frac": {"digit": "frac", "zero": "frac", "exp": "exp0"}, "exp0": {"sign": "exp1", "digit": "exp", "zero": "exp"},
    "exp1": {"digit": "exp", "zero": "exp"}, "exp": {"digit": "exp", "zero": "exp"}}
_NUMBER_ACCEPTING = {"zero", "int", "frac", "exp"}


def _number_class(char: str) -> str | None:
    if char == "0":
        return "zero"
    if char.isdigit() and char.isascii():
        return "digit"
    return {".": "dot", "e": "exp", "E": "exp", "-": "sign", "+": "sign"}.get(char)


class JsonValueScanner:
    """Accepts one JSON value a character at a time: `push(char)` says whether the value goes on, ended with this
    character, ended just before it (a number ends at the next delimiter), or cannot be JSON."""

    def __init__(self) -> None:
        self._stack: list[str] = []  # "{" or "["
        self._state = "value"
        self._literal = ""
        self._number = ""
        self._unicode_left = 0
        self._string_is_key = False

    def push(self, char: str) -> str:
        state = self._state
        if state == "string":
            if char == "\\":
                self._state = "escape"
            elif char == '"':
                return self._string_done()
            elif ord(char) < 0x20:
                return INVALID
            return MORE
        if state == "escape":
            if char == "u":
                self._state, self._unicode_left = "unicode", 4
            elif char in '"\\/bfnrt':
                self._state = "string"
            else:
                return INVALID
            return MORE
        if state == "unicode":
            if char not in "0123456789abcdefABCDEF":
                return INVALID
            self._unicode_left -= 1
            if self._unicode_left == 0:
                self._state = "string"
            return MORE
        if state == "literal":
            if not self._literal.startswith(char):
                return INVALID
            self._literal = self._literal[1:]
            return self._value_done() if not self._literal else MORE
        if state == "number":
            next_state = _NUMBER_NEXT[self._number].get(_number_class(char))
            if next_state is not None:
                self._number = next_state
                return MORE
            if self._number not in _NUMBER_ACCEPTING:
                return INVALID
            result = self._value_done()
            if result == DONE:
                return DONE_BEFORE
            return self.push(char)
        if char in WHITESPACE:
            return MORE
        if state in ("value", "array_first"):
            if state == "array_first" and char == "]":
                return self._close()
            return self._start_value(char)
        if state in ("key_first", "key"):
            if char == '"':
                self._state, self._string_is_key = "string", True
                return MORE
            return self._close() if state == "key_first" and char == "}" else INVALID
        if state == "colon":
            if char != ":":
                return INVALID
            self._state = "value"
            return MORE
        if state == "after":
            top = self._stack[-1]
            if char == ",":
                self._state = "key" if top == "{" else "value"
                return MORE
            if (top, char) in (("{", "}"), ("[", "]")):
                return self._close()
            return INVALID
        return INVALID

    def finish(self) -> bool:
        """Whether the text so far is a whole value (a top-level number has no closing character)."""
        return self._state == "number" and not self._stack and self._number in _NUMBER_ACCEPTING

    def _start_value(self, char: str) -> str:
        if char == "{":
            self._stack.append("{")
            self._state = "key_first"
        elif char == "[":
            self._stack.append("[")
            self._state = "array_first"
        elif char == '"':
            self._state, self._string_is_key = "string", False
        elif char == "-" or char.isdigit() and char.isascii():
            self._state, self._number = "number", "sign" if char == "-" else _NUMBER_NEXT["sign"][_number_class(char)]
        elif char in "tfn":
            self._state, self._literal = "literal", {"t": "rue", "f": "alse", "n": "ull"}[char]
        else:
            return INVALID
        return MORE

    def _string_done(self) -> str:
        if self._string_is_key:
            self._state = "colon"
            return MORE
        return self._value_done()

    def _close(self) -> str:
        self._stack.pop()
        return self._value_done()

    def _value_done(self) -> str:
        if not self._stack:
            self._state = "end"
            return DONE
        self._state = "after"
        return MORE


@dataclass
class CallScan:
    """What one `JsonCallScanner.feed` found: characters consumed, the name if it just became whole, the raw
    argument characters read, and whether the call object ended or turned out not to be a call."""
    consumed: int = 0
    name: str | None = None
    arguments: str = ""
    done: bool = False
    invalid: bool = False
    extra_keys: list[str] = field(default_factory=list)


class JsonCallScanner:
    """Reads `{"name": "f", "arguments": {...}}` (keys in any order; `argument_keys` names the arguments key)."""

    def __init__(self, argument_keys: tuple[str, ...] = ("arguments",)) -> None:
        self.argument_keys = argument_keys
        self.name: str | None = None
        self.has_arguments = False
        self._state = "start"
        self._value: JsonValueScanner | None = None
        self._raw = ""
        self._role = ""

    def feed(self, text: str) -> CallScan:
        scan = CallScan()
        index = 0
        while index < len(text) and not (scan.done or scan.invalid):
            outcome = self._push(text[index], scan)
            if outcome != "again" and not scan.invalid:  # the character that breaks the call stays unread
                index += 1
        scan.consumed = index
        return scan

    def _push(self, char: str, scan: CallScan) -> str:
        state = self._state
        if state in ("start", "key_or_end", "colon", "value_start", "comma_or_end") and char in WHITESPACE:
            return "ok"
        if state == "start":
            if char != "{":
                scan.invalid = True
            self._state = "key_or_end"
        elif state == "key_or_end":
            if char == "}":
                scan.done = True
            elif char == '"':
                self._begin_value(char, "key")
                self._state = "key"
            else:
                scan.invalid = True
        elif state == "colon":
            if char != ":":
                scan.invalid = True
            self._state = "value_start"
        elif state == "comma_or_end":
            if char == ",":
                self._state = "key_or_end"
            elif char == "}":
                scan.done = True
            else:
                scan.invalid = True
        elif state == "value_start":
            key = self._key
            if key == "name":
                role = "name"
            elif key in self.argument_keys and not self.has_arguments:
                if char not in '{"':  # arguments must be an object, or one serialized in a string (Granite)
                    scan.invalid = True
                    return "ok"
                role = "arguments" if char == "{" else "serialized_arguments"
                self.has_arguments = True
            else:
                role = "other"
            self._begin_value("", role)
            self._state = "value"
            return self._push(char, scan)
        else:  # "key" or "value": inside a JSON value
            outcome = self._value.push(char)
            if outcome == INVALID:
                scan.invalid = True
                return "ok"
            if outcome != DONE_BEFORE:
                self._raw += char
                if self._role == "arguments":
                    scan.arguments += char
            if outcome in (DONE, DONE_BEFORE):
                self._end_value(scan)
                return "again" if outcome == DONE_BEFORE else "ok"
        return "ok"

    def _begin_value(self, first: str, role: str) -> None:
        self._value, self._role, self._raw = JsonValueScanner(), role, ""
        if first:
            self._value.push(first)
            self._raw = first

    def _end_value(self, scan: CallScan) -> None:
        if self._role == "key":
            self._key = json.loads(self._raw)
            self._state = "colon"
            return
        if self._role == "name":
            name = json.loads(self._raw)
            if not isinstance(name, str) or self.name is not None:
                scan.invalid = True
                return
            self.name = scan.name = name
        if self._role == "serialized_arguments":  # sent whole once the string ends, decoded once
            arguments = json.loads(self._raw)
            try:
                is_object = isinstance(json.loads(arguments), dict)
            except json.JSONDecodeError:
                is_object = False
            if not is_object:
                scan.invalid = True
                return
            scan.arguments += arguments.strip()
        self._state = "comma_or_end"


class JsonCallReader:
    """Drives a `JsonCallScanner` for one call and turns what it finds into the parser's emissions: the call
    starts once its name is whole and its arguments have begun (arguments read before the name wait for it)."""

    def __init__(self, parser, argument_keys: tuple[str, ...] = ("arguments",), arguments_required: bool = False):
        self._parser = parser
        self._scanner = JsonCallScanner(argument_keys)
        self._arguments_required = arguments_required
        self._waiting_arguments = ""
        self.started = False
        self.raw = ""  # the characters of the call object consumed so far

    def feed(self, text: str) -> tuple[int, str | None]:
        """Consumes a prefix of `text`; the outcome is None (needs more), "done", or "invalid"."""
        scan = self._scanner.feed(text)
        self.raw += text[:scan.consumed]
        self._waiting_arguments += scan.arguments
        # past the arguments' opening brace: `{invalid` is refused before any of it is sent as a call
        if not self.started and self._scanner.name is not None and len("".join(self._waiting_arguments.split())) > 1:
            self._parser._start_call(self._scanner.name)
            self.started = True
        if self.started:
            self._parser._emit_arguments(self._waiting_arguments)
            self._waiting_arguments = ""
        if scan.invalid:
            return scan.consumed, "invalid"
        if scan.done:
            if not self.started and self._scanner.name is not None and not self._arguments_required:
                self._parser._start_call(self._scanner.name)
                self._parser._emit_arguments("{}")
                self.started = True
            return scan.consumed, "done" if self.started else "invalid"
        return scan.consumed, None
