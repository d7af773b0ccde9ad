"""The request side of tool calling: `tools`, `tool_choice`, `parallel_tool_calls`, assistant `tool_calls` and their
validation, and the conversion of OpenAI-shaped tool calls into what Hugging Face chat templates expect.

Bad input raises `InvalidArgument(param, message)` with the OpenAI body field at fault (`tools[1].function.name`,
`tool_choice`), which the server answers as a 400.
"""
from __future__ import annotations

import functools
import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from serval.openai.errors import InvalidArgument

_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class ChatCompletionTool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition

    def template_dict(self) -> dict:
        """The tool as chat templates take it (`apply_chat_template(tools=[...])`): OpenAI's own shape."""
        return {"type": "function", "function": self.function.model_dump(exclude_none=True)}


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as a string (OpenAI's wire format)


class AssistantToolCall(BaseModel):
    """One entry of an assistant message's `tool_calls` in the conversation history."""
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolRequestFields(BaseModel):
    """The tool fields of a chat request; ChatCompletionRequest inherits them."""
    tools: list[ChatCompletionTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice_form(cls, value):
        if isinstance(value, str) and value not in ("none", "auto", "required"):
            raise InvalidArgument("tool_choice", f"tool_choice must be 'none', 'auto', 'required' or "
                                  f'{{"type": "function", "function": {{"name": ...}}}}, got {value!r}')
        return value

    @model_validator(mode="after")
    def _tools_consistent(self):
        check_tools(self.tools, self.tool_choice)
        return self

    def resolved_tool_choice(self) -> str | NamedToolChoice:
        """OpenAI's default: "auto" with tools, "none" without."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    def template_tools(self) -> list[dict] | None:
        return [tool.template_dict() for tool in self.tools] if self.tools else None

    def tool_dicts(self) -> list[dict]:
        """The tools as plain dicts, what the parsers and the grammar builder take."""
        return [tool.template_dict() for tool in self.tools or []]


def check_tools(tools: list[ChatCompletionTool] | None, tool_choice: str | NamedToolChoice | None) -> None:
    names: dict[str, int] = {}
    for index, tool in enumerate(tools or []):
        name = tool.function.name
        if not _FUNCTION_NAME.fullmatch(name):
            raise InvalidArgument(f"tools[{index}].function.name",
                                  f"function name {name!r} must be 1 to 64 of a-z, A-Z, 0-9, '_', '.', '-'")
        if name in names:
            raise InvalidArgument(f"tools[{index}].function.name",
                                  f"duplicate function name {name!r} (also tools[{names[name]}])")
        names[name] = index
        _check_parameters(tool.function.parameters, f"tools[{index}].function.parameters")
    if tool_choice == "required" and not names:
        raise InvalidArgument("tool_choice", 'tool_choice "required" needs at least one tool in tools')
    if isinstance(tool_choice, NamedToolChoice) and tool_choice.function.name not in names:
        allowed = ", ".join(names) or "none: tools is empty"
        raise InvalidArgument("tool_choice", f"tool_choice names function {tool_choice.function.name!r}, which is "
                              f"not in tools (allowed: {allowed})")


def _check_parameters(parameters: dict | None, param: str) -> None:
    if parameters is None:
        return
    kind = parameters.get("type", "object")
    if kind != "object":
        raise InvalidArgument(param, f"parameters must be a JSON schema of type 'object', got type {kind!r}")
    properties = parameters.get("properties", {})
    if not isinstance(properties, dict) or not all(isinstance(value, (dict, bool)) for value in properties.values()):
        raise InvalidArgument(param, "parameters.properties must map each parameter name to a JSON schema")
    if not isinstance(parameters.get("required", []), list):
        raise InvalidArgument(param, "parameters.required must be a list of parameter names")
    try:
        canonical = json.dumps(parameters, sort_keys=True)
    except (TypeError, ValueError):
        raise InvalidArgument(param, "parameters must be a JSON object") from None
    problem = _schema_problem(canonical)
    if problem is not None:
        raise InvalidArgument(param, f"parameters is not a valid JSON schema: {problem}")


@functools.lru_cache(maxsize=1024)
def _schema_problem(canonical: str) -> str | None:
    """Why the schema (its canonical JSON text) is not valid JSON Schema, or None. Cached: agents send the same
    tools with every turn, and the meta-schema check takes milliseconds on the event loop per tool."""
    try:
        import jsonschema  # optional: a schema that is not valid JSON Schema is refused when we can tell
    except ImportError:
        return None
    parameters = json.loads(canonical)
    try:
        jsonschema.validators.validator_for(parameters).check_schema(parameters)
    except jsonschema.SchemaError as error:
        return error.message
    return None


class ToolCallMessageFields(BaseModel):
    """The tool fields of a chat message; ChatMessage inherits them (it already has `tool_call_id`)."""
    tool_calls: list[AssistantToolCall] | None = None

    @field_validator("tool_calls")
    @classmethod
    def _arguments_are_json_objects(cls, tool_calls):
        for index, call in enumerate(tool_calls or []):
            parse_arguments(call.function.arguments, f"tool_calls[{index}].function.arguments")
        return tool_calls


def parse_arguments(arguments: str, param: str) -> dict:
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError as error:
        raise InvalidArgument(param, f"arguments must be a JSON object as a string: {error}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(param, f"arguments must be a JSON object, got {type(value).__name__}")
    return value


def template_tool_calls(tool_calls: list[AssistantToolCall]) -> list[dict]:
    """Assistant tool calls as Hugging Face templates read them: arguments a dict (templates `tojson` them)."""
    return [{"id": call.id, "type": "function",
             "function": {"name": call.function.name,
                          "arguments": parse_arguments(call.function.arguments, "tool_calls.function.arguments")}}
            for call in tool_calls]


def tool_template_fields(message: ToolCallMessageFields) -> dict:
    """The keys a message's tool calls add to its chat-template dict (none for a message without calls)."""
    return {"tool_calls": template_tool_calls(message.tool_calls)} if message.tool_calls else {}
