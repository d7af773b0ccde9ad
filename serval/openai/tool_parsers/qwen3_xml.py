"""`qwen3_xml` (also `qwen3_coder`): Qwen3-Coder's XML calls,

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

Parameter values are text; they become JSON by the type the tool's schema gives the parameter (integer, number,
boolean, object, array, null, string). Each parameter is sent as an argument fragment once its value is whole, so
the fragments of a call concatenate to `json.dumps` of its arguments."""
from __future__ import annotations

import ast
import json

from serval.openai.tool_parsers.base import ToolParser, partial_marker_length

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
FUNCTION_START, FUNCTION_END = "<function=", "</function>"
PARAMETER_START, PARAMETER_END = "<parameter=", "</parameter>"


def _schema_types(schema: dict) -> list[str]:
    declared = schema.get("type")
    if isinstance(declared, str):
        return [declared]
    if isinstance(declared, list):
        return [t for t in declared if isinstance(t, str)]
    types = []
    for option in schema.get("anyOf", []) + schema.get("oneOf", []):
        if isinstance(option, dict):
            types.extend(_schema_types(option))
    return types


def _convert_as(value: str, kind: str):
    """`value` as the JSON type `kind`; raises ValueError when it is not one."""
    if kind in ("string", "str", "text"):
        return value
    if kind in ("integer", "int"):
        return int(value)
    if kind in ("number", "float"):
        try:
            return int(value)
        except ValueError:
            number = float(value)
            if number != number or number in (float("inf"), float("-inf")):
                raise ValueError(value)
            return number
    if kind in ("boolean", "bool"):
        if value.lower() not in ("true", "false"):
            raise ValueError(value)
        return value.lower() == "true"
    if kind == "null":
        if value.lower() not in ("null", "none"):
            raise ValueError(value)
        return None
    if kind in ("object", "array", "dict", "list"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = ast.literal_eval(value)  # models sometimes write Python literals
        if not isinstance(parsed, dict if kind in ("object", "dict") else list):
            raise ValueError(value)
        return parsed
    raise ValueError(kind)


def convert_parameter(value: str, schema: dict | None):
    """A parameter's text as JSON, typed by its schema; text that fits no declared type stays a string."""
    types = _schema_types(schema or {})
    if "null" in types and value.lower() == "null":
        return None
    if not types:
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    for kind in [t for t in types if t != "null"]:
        try:
            return _convert_as(value, kind)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return value


class Qwen3XmlToolParser(ToolParser):

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._state = "text"
        self._name = ""
        self._key = ""
        self._num_parameters = 0
        self._opened_with_tag = False

    def _consume(self, final: bool) -> None:
        while self._step(final):
            pass
        if final:
            if self._state == "value":
                self._emit_parameter(self._buffer)
                self._buffer, self._state = "", "parameters"
            if self._state == "parameters":
                self._close_call()
            elif self._state in ("call", "name"):
                self._emit_text((CALL_START if self._opened_with_tag else "") + self._buffer)
                self._buffer = ""
            self._emit_text(self._buffer)
            self._buffer = ""
            self._finish_text()

    def _step(self, final: bool) -> bool:
        state, buffer = self._state, self._buffer
        if state == "text":
            found = [(buffer.find(marker), marker) for marker in (CALL_START, FUNCTION_START)]
            found = [item for item in found if item[0] >= 0]
            if not found:
                keep = 0 if final else max(partial_marker_length(buffer, CALL_START),
                                           partial_marker_length(buffer, FUNCTION_START))
                self._emit_text(buffer[:len(buffer) - keep])
                self._buffer = buffer[len(buffer) - keep:]
                return False
            position, marker = min(found)
            self._emit_text(buffer[:position])
            self._opened_with_tag = marker == CALL_START
            self._buffer = buffer[position + len(marker):]
            self._state = "call" if self._opened_with_tag else "name"
            return True
        if state == "call":
            stripped = buffer.lstrip()
            if stripped.startswith(FUNCTION_START):
                self._buffer, self._state = stripped[len(FUNCTION_START):], "name"
                return True
            if not final and FUNCTION_START.startswith(stripped):
                return False
            self._emit_text(CALL_START)  # not a call after all
            self._state = "text"
            return True
        if state == "name":
            end = buffer.find(">")
            if end < 0:
                return False
            self._start_call(buffer[:end].strip())
            self._buffer, self._state, self._num_parameters = buffer[end + 1:], "parameters", 0
            return True
        if state == "parameters":
            stripped = buffer.lstrip()
            if stripped.startswith(PARAMETER_START):
                end = stripped.find(">")
                if end < 0:
                    return False
                self._key = stripped[len(PARAMETER_START):end].strip()
                self._buffer, self._state = stripped[end + 1:], "value"
                return True
            if stripped.startswith(FUNCTION_END):
                self._close_call()
                self._buffer = stripped[len(FUNCTION_END):]
                return True
            if not final and (PARAMETER_START.startswith(stripped[:len(PARAMETER_START)])
                              or FUNCTION_END.startswith(stripped)):
                return False
            self._close_call()  # malformed: the call ends here and the rest is text
            return True
        if state == "value":
            ends = [(buffer.find(marker), marker) for marker in (PARAMETER_END, PARAMETER_START, FUNCTION_END)]
            ends = [item for item in ends if item[0] >= 0]
            if not ends:
                return False
            position, marker = min(ends)
            self._emit_parameter(buffer[:position])
            self._buffer = buffer[position + len(PARAMETER_END):] if marker == PARAMETER_END else buffer[position:]
            self._state = "parameters"
            return True
        # "after_call": the closing tag if the call opened with one
        stripped = buffer.lstrip()
        if self._opened_with_tag and stripped.startswith(CALL_END):
            self._buffer, self._state = stripped[len(CALL_END):], "text"
            return True
        if self._opened_with_tag and not final and CALL_END.startswith(stripped):
            return False
        self._state = "text"
        return True

    def _emit_parameter(self, text: str) -> None:
        if text.startswith("\n"):
            text = text[1:]
        if text.endswith("\n"):
            text = text[:-1]
        schema = self.tool_schemas.get(self._calls[-1].name, {}).get("properties", {}).get(self._key)
        value = convert_parameter(text, schema if isinstance(schema, dict) else None)
        separator = "{" if self._num_parameters == 0 else ", "
        self._emit_arguments(f"{separator}{json.dumps(self._key, ensure_ascii=False)}: "
                             f"{json.dumps(value, ensure_ascii=False)}")
        self._num_parameters += 1

    def _close_call(self) -> None:
        self._emit_arguments("}" if self._num_parameters else "{}")
        self._state = "after_call"
