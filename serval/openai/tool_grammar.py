"""The grammar behind `tool_choice` "required" and a named function: Lark text for llguidance that forces one call
(or, with `parallel_tool_calls`, one or more) in the chosen parser's format, with arguments valid against the
tool's JSON schema, so even a random-weight model returns calls that parse and validate.

The result is a string for `StructuredOutputsParams(grammar=...)`. Markers that are single added tokens of the
vocabulary (Qwen's `<tool_call>`, Mistral's `[TOOL_CALLS]`, `</think>`) must be written as token references
(`<[151657]>`): llguidance matches added tokens by id, never by their text. The caller passes the tokenizer's
added vocabulary (`tokenizer.get_added_vocab()`) for that.

`with_reasoning(grammar)` prefixes any such grammar (or a `json_schema_grammar`) with a free think section and
its end marker, so a reasoning model thinks unconstrained and the constraint applies after `</think>`.
`with_analysis` is the same for gpt-oss's harmony format: an optional free analysis message comes first.
"""
from __future__ import annotations

import json
from collections.abc import Mapping

from serval.openai.errors import InvalidArgument
from serval.openai.tool_parsers import deepseek

# Canonical separators, no free whitespace: a weak model cannot pad forever, and the text matches what the
# chat templates render for past calls (`tojson`: ", " and ": ").
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
GRAMMAR_FORMATS = ("hermes", "llama3_json", "mistral", "phi4_mini_json", "qwen3_xml", "qwen3_coder", "deepseek_v3",
                   "deepseek_v31", "openai")
DEEPSEEK_FORMATS = ("deepseek_v3", "deepseek_v31")
_REGEX_SPECIAL = set("\\.+*?()|[]{}^$/&-~#")
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def marker(text: str, added_tokens: Mapping[str, int]) -> str:
    """A Lark terminal for `text`: the token reference when it is one added token, else the quoted text."""
    token_id = added_tokens.get(text)
    return f"<[{token_id}]>" if token_id is not None else json.dumps(text)


def _parameters(tool: dict) -> dict:
    parameters = tool["function"].get("parameters")
    return parameters if parameters else _NO_PARAMETERS


def _json(schema: dict) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": JSON_STYLE})


def _call_object(name: str, parameters: dict, arguments_key: str = "arguments") -> dict:
    return {"type": "object", "properties": {"name": {"const": name}, arguments_key: parameters},
            "required": ["name", arguments_key], "additionalProperties": False}


def tool_call_grammar(parser_name: str, tools: list[dict], tool_choice: str | dict, parallel_tool_calls: bool = True,
                      added_tokens: Mapping[str, int] | None = None) -> str:
    """Lark for `tool_choice` "required" (any of `tools`) or a named function (`{"type": "function", "function":
    {"name": ...}}` or its name), in the format `parser_name` reads back."""
    added_tokens = added_tokens or {}
    if isinstance(tool_choice, dict):
        tool_choice = tool_choice["function"]["name"]
    if tool_choice == "required":
        chosen = tools
    else:
        chosen = [tool for tool in tools if tool["function"]["name"] == tool_choice]
    if not chosen:
        raise InvalidArgument("tool_choice", f"tool_choice {tool_choice!r} matches no function in tools")
    if parser_name not in GRAMMAR_FORMATS:
        raise InvalidArgument("tool_choice", f"tool_choice {tool_choice!r} needs a grammar for the "
                              f"{parser_name!r} tool call parser; supported: {', '.join(GRAMMAR_FORMATS)}")
    rules = [f"fn{index}: {_function_body(parser_name, tool, added_tokens)}" for index, tool in enumerate(chosen)]
    rules.append("function: " + " | ".join(f"fn{index}" for index in range(len(chosen))))
    rules.extend(_calls(parser_name, parallel_tool_calls, added_tokens))
    grammar = "\n".join(["start: constraint", *rules]) + "\n"
    # gpt-oss thinks in an analysis message before it calls; the grammar lets it, as its parser reads it
    return with_analysis(grammar, added_tokens) if parser_name == "openai" else grammar


def _function_body(parser_name: str, tool: dict, added_tokens: Mapping[str, int]) -> str:
    name = tool["function"]["name"]
    if parser_name in ("hermes", "mistral", "phi4_mini_json"):
        return _json(_call_object(name, _parameters(tool)))
    if parser_name == "llama3_json":
        return _json(_call_object(name, _parameters(tool), "parameters"))
    if parser_name in DEEPSEEK_FORMATS:
        return _deepseek_function(parser_name, name, _parameters(tool), added_tokens)
    if parser_name == "openai":
        header = f'{marker("<|channel|>", added_tokens)} {json.dumps(f"commentary to=functions.{name} ")}'
        return (f'{header} {marker("<|constrain|>", added_tokens)} "json" {marker("<|message|>", added_tokens)} '
                f'{_json(_parameters(tool))}')
    return _xml_function(name, _parameters(tool))


def _calls(parser_name: str, parallel: bool, added_tokens: Mapping[str, int]) -> list[str]:
    def repeated(item: str, separator: str) -> str:
        return f"{item} ({json.dumps(separator)} {item})*" if parallel else item

    if parser_name in ("hermes", "qwen3_xml", "qwen3_coder"):
        start, end = marker("<tool_call>", added_tokens), marker("</tool_call>", added_tokens)
        return [f'call: {start} "\\n" function "\\n" {end}', f"constraint: {repeated('call', chr(10))}"]
    if parser_name == "llama3_json":
        return [f"constraint: {repeated('function', '; ')}"]
    if parser_name in DEEPSEEK_FORMATS:
        begin, end = marker(deepseek.CALLS_BEGIN, added_tokens), marker(deepseek.CALLS_END, added_tokens)
        call = f"{marker(deepseek.CALL_BEGIN, added_tokens)} function {marker(deepseek.CALL_END, added_tokens)}"
        return [f"call: {call}", f"constraint: {begin} {'call+' if parallel else 'call'} {end}"]
    if parser_name == "openai":
        # One call whatever `parallel`: `<|call|>` ends gpt-oss's turn (it stops the request) until the result comes.
        return [f'constraint: function {marker("<|call|>", added_tokens)}']
    # a JSON array of calls: Mistral's after its [TOOL_CALLS] token, Phi-4-mini's after the text `functools`
    opening = '"functools["' if parser_name == "phi4_mini_json" else f'{marker("[TOOL_CALLS]", added_tokens)} "["'
    return [f'constraint: {opening} {repeated("function", ", ")} "]"']


def _deepseek_function(parser_name: str, name: str, parameters: dict, added_tokens: Mapping[str, int]) -> str:
    """V3 / R1-0528: `function<｜tool▁sep｜>NAME` and the arguments in a json fence; V3.1:
    `NAME<｜tool▁sep｜>{...}`."""
    separator = marker(deepseek.SEP, added_tokens)
    if parser_name == "deepseek_v31":
        return f"{json.dumps(name)} {separator} {_json(parameters)}"
    opening, closing = json.dumps(f"{name}\n```json\n"), json.dumps("\n```")
    return f'"function" {separator} {opening} {_json(parameters)} {closing}'


def _xml_function(name: str, parameters: dict) -> str:
    """`<function=name>` and each parameter in schema order (the optional ones may be left out)."""
    required = set(parameters.get("required", []))
    parts = [json.dumps(f"<function={name}>\n")]
    for key, schema in parameters.get("properties", {}).items():
        opening, closing = json.dumps(f"<parameter={key}>\n"), json.dumps("\n</parameter>\n")
        item = f"{opening} {_xml_value(schema)} {closing}"
        parts.append(f"({item})" + ("" if key in required else "?"))
    parts.append(json.dumps("</function>"))
    return " ".join(parts)


def _xml_value(schema: dict) -> str:
    """A parameter's text: plain text where the schema allows a string (the parser keeps it as text), JSON for
    every other type. String `pattern` and `format` are not enforced in this form; lengths and enums are."""
    schema = schema if isinstance(schema, dict) else {}
    types = schema.get("type")
    types = [types] if isinstance(types, str) else types if isinstance(types, list) else []
    if "string" not in types:
        return _json(schema)
    if "enum" in schema:
        return "(" + " | ".join(json.dumps(str(value)) for value in schema["enum"]) + ")"
    # no "<": the value cannot run into the closing tag; no newline at either end: the parser strips one there
    longest = schema.get("maxLength")
    if longest == 1:
        return "/[^<\\n]/"
    inner = "*" if longest is None else f"{{0,{max(longest - 2, 0)}}}"
    return f"/[^<\\n]([^<]{inner}[^<\\n])?/"


def json_schema_grammar(schema: dict) -> str:
    """A JSON schema as Lark with a `constraint` rule, for `with_reasoning` (response_format json_schema)."""
    return f"start: constraint\nconstraint: {_json(schema)}\n"


def with_reasoning(grammar: str, added_tokens: Mapping[str, int] | None = None, think_start: str = "<think>",
                   think_end: str = "</think>", thought_optional: bool = False) -> str:
    """`grammar` (whose top rule is `constraint`) after a free think section: an optional `<think>`, any text
    without the end marker, the end marker, newlines, then the constraint. `thought_optional`: the section may be
    left out, and when written it opens with its start marker (Magistral's: output without it is no thought)."""
    added_tokens = added_tokens or {}
    rules = grammar.replace("start: constraint\n", "", 1)
    opening = marker(think_start, added_tokens)
    section = f"({opening} thought)?" if thought_optional else f"{opening}? thought"
    if think_end in added_tokens:
        # the end marker is one token, which no text lexeme can contain: any text, then that token
        thought = f"thought: THOUGHT {marker(think_end, added_tokens)}\nTHOUGHT: /(?s:.*)/"
    else:
        # spelled in text: lazy, so the thought ends at the first end marker, as the reasoning parser reads it
        escaped = "".join("\\" + char if char in _REGEX_SPECIAL else char for char in think_end)
        thought = f"thought[lazy]: /(?s:.*){escaped}/"
    return f"start: {section} /\\n{{0,2}}/ constraint\n{thought}\n{rules}"


def with_analysis(grammar: str, added_tokens: Mapping[str, int] | None = None) -> str:
    """`grammar` (top rule `constraint`) after an optional harmony analysis message: any text up to `<|end|>`,
    then the next message's `<|start|>assistant`. The constraint writes its own channel header."""
    added_tokens = added_tokens or {}
    rules = grammar.replace("start: constraint\n", "", 1)
    end = marker("<|end|>", added_tokens)
    opening = f'{marker("<|channel|>", added_tokens)} "analysis" {marker("<|message|>", added_tokens)}'
    if "<|end|>" in added_tokens:  # one token, which no text lexeme can contain
        analysis = f'analysis: {opening} ANALYSIS {end} {marker("<|start|>", added_tokens)} "assistant"\n' \
                   "ANALYSIS: /(?s:.*)/"
    else:  # spelled in text: lazy, so the analysis ends at the first end marker
        analysis = f'analysis: {opening} analysis_text {marker("<|start|>", added_tokens)} "assistant"\n' \
                   "analysis_text[lazy]: /(?s:.*)<\\|end\\|>/"
    return f"start: analysis? constraint\n{analysis}\n{rules}"


def in_final_message(grammar: str, added_tokens: Mapping[str, int] | None = None) -> str:
    """`grammar`'s constraint as the body of a harmony final message (gpt-oss's answer channel)."""
    added_tokens = added_tokens or {}
    header = f'{marker("<|channel|>", added_tokens)} "final" {marker("<|message|>", added_tokens)}'
    rules = grammar.replace("start: constraint\n", "", 1).replace("constraint:", "answer:", 1)
    return f"start: constraint\nconstraint: {header} answer\n{rules}"
