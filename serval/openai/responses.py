"""OpenAI's Responses API on the wire: the request body (pydantic), its input items in one canonical shape (the
shape `GET /v1/responses/{id}/input_items` returns and the store keeps), the step from items to chat-template
messages, the tool fields as the chat path reads them, and the response object (its output items and stream
events are assembled in response_output.py).

Items are plain dicts in OpenAI's shapes from the moment they are validated: they go to the client, to SQLite and
back to the chat template without another model in between. The item shapes and event names are those of the
`openai` package's `types/responses/`.

Torch-free: the router may import it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Annotated, Literal, Union

from pydantic import Field, StrictStr, field_validator, model_validator

from serval.openai.errors import InvalidArgument
from serval.openai.protocol import (Bool, JsonSchemaFormat, OpenAIBase, PositiveInt, ResponseFormat,
                                    SamplingFields, random_id)
from serval.openai.tools import ChatCompletionTool, NamedToolChoice, check_tools
from serval.sampling_params import SamplingParams

ItemStatus = Literal["in_progress", "completed", "incomplete"]
# Text content part types; images, files and audio are refused (Serval serves text models).
TEXT_PART_TYPES = ("input_text", "output_text", "refusal")
# OpenAI's bounds on metadata.
MAX_METADATA_KEYS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512


# ---------------------------------------------------------------- input items
class ContentPart(OpenAIBase):
    type: StrictStr
    text: StrictStr | None = None
    refusal: StrictStr | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type not in TEXT_PART_TYPES:
            raise ValueError(f"content part type {self.type!r} is not supported; allowed: "
                             f"{', '.join(TEXT_PART_TYPES)}")
        if (self.refusal if self.type == "refusal" else self.text) is None:
            raise ValueError(f"a {self.type!r} part needs its {'refusal' if self.type == 'refusal' else 'text'}")
        return self

    def plain_text(self) -> str:
        return self.refusal if self.type == "refusal" else self.text


class MessageItem(OpenAIBase):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: StrictStr | list[ContentPart]
    id: StrictStr | None = None


class FunctionCallItem(OpenAIBase):
    type: Literal["function_call"]
    call_id: StrictStr
    name: StrictStr
    arguments: StrictStr
    id: StrictStr | None = None


class FunctionCallOutputItem(OpenAIBase):
    type: Literal["function_call_output"]
    call_id: StrictStr
    output: StrictStr | list[ContentPart]
    id: StrictStr | None = None


class ReasoningPart(OpenAIBase):
    type: Literal["summary_text", "reasoning_text"]
    text: StrictStr


class ReasoningItem(OpenAIBase):
    type: Literal["reasoning"]
    id: StrictStr | None = None
    summary: list[ReasoningPart] = Field(default_factory=list)
    content: list[ReasoningPart] | None = None
    encrypted_content: StrictStr | None = None


InputItem = Annotated[Union[MessageItem, FunctionCallItem, FunctionCallOutputItem, ReasoningItem],
                      Field(discriminator="type")]


# ---------------------------------------------------------------- the request
class FunctionTool(OpenAIBase):
    type: Literal["function"]
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict | None = None
    strict: Bool | None = None


class ToolChoiceObject(OpenAIBase):
    type: StrictStr
    name: StrictStr | None = None

    @model_validator(mode="after")
    def _a_function(self):
        if self.type != "function" or self.name is None:
            raise ValueError(f"tool_choice {{'type': {self.type!r}}} is not supported: give 'none', 'auto', "
                             "'required' or {'type': 'function', 'name': ...} naming one of the function tools")
        return self


class TextFormat(OpenAIBase):
    type: Literal["text", "json_object", "json_schema"]
    name: StrictStr | None = None
    description: StrictStr | None = None
    json_schema: dict | None = Field(default=None, alias="schema")
    strict: Bool | None = None

    @model_validator(mode="after")
    def _schema_for_json_schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'schema', a JSON schema object")
        return self


class TextConfig(OpenAIBase):
    format: TextFormat | None = None


class ResponsesRequest(SamplingFields):
    """POST /v1/responses. The sampling extras (top_k, min_p, seed, stop, penalties, ...) are vLLM's, as in chat."""
    input: StrictStr | list[InputItem]
    instructions: StrictStr | None = None
    max_output_tokens: PositiveInt | None = None
    tools: list[FunctionTool] = Field(default_factory=list)
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceObject = "auto"
    parallel_tool_calls: Bool = True
    text: TextConfig | None = None
    metadata: dict[str, StrictStr] | None = None
    store: Bool = True
    previous_response_id: StrictStr | None = None
    background: Bool = False
    truncation: Literal["disabled", "auto"] = "disabled"
    reasoning: dict | None = None
    chat_template_kwargs: dict | None = None  # vLLM's extension, as in chat (e.g. {"enable_thinking": false})
    conversation: StrictStr | dict | None = None
    # One answer per request: the Responses API has no `n`.
    n: Literal[1] = 1

    @field_validator("input", mode="before")
    @classmethod
    def _input_items(cls, value):
        """An item without `type` is a message (OpenAI's EasyInputMessage); an empty input asks for nothing."""
        if isinstance(value, str) and not value:
            raise ValueError("input is empty; give a string or a list of input items")
        if isinstance(value, list):
            if not value:
                raise ValueError("input is an empty list; give at least one input item")
            return [{**item, "type": "message"} if isinstance(item, dict) and "type" not in item else item
                    for item in value]
        return value

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools_only(cls, value):
        for index, tool in enumerate(value if isinstance(value, list) else []):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise ValueError(f"tools[{index}] has type {kind!r}; this server runs function tools only "
                                 "(type 'function')")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_bounds(cls, value):
        if value is None:
            return value
        if len(value) > MAX_METADATA_KEYS:
            raise ValueError(f"at most {MAX_METADATA_KEYS} metadata keys, got {len(value)}")
        for key, item in value.items():
            if len(key) > MAX_METADATA_KEY_CHARS or len(item) > MAX_METADATA_VALUE_CHARS:
                raise ValueError(f"metadata keys have at most {MAX_METADATA_KEY_CHARS} characters and values at "
                                 f"most {MAX_METADATA_VALUE_CHARS}; {key[:40]!r} is over")
        return value

    @model_validator(mode="after")
    def _tools_consistent(self):
        """The chat API's checks (names, schemas, duplicates, tool_choice naming a tool), under this API's
        field names."""
        try:
            check_tools(self._chat_tools(), self._named_choice() or self.tool_choice)
        except InvalidArgument as error:
            raise InvalidArgument(error.param.replace(".function.", "."), str(error)) from None
        return self

    @model_validator(mode="after")
    def _text_format_is_the_response_format(self):
        """text.format takes the chat API's response_format path to StructuredOutputsParams."""
        text_format = self.text.format if self.text is not None else None
        if text_format is None or text_format.type == "text":
            return self
        if self.response_format is not None or self.structured_outputs is not None:
            raise ValueError("give either text.format or response_format / structured_outputs, not both")
        schema = None
        if text_format.type == "json_schema":
            schema = JsonSchemaFormat(name=text_format.name, description=text_format.description,
                                      schema=text_format.json_schema, strict=text_format.strict)
        self.response_format = ResponseFormat(type=text_format.type, json_schema=schema)
        return self

    @property
    def max_tokens(self) -> int | None:
        """The span's gen_ai.request.max_tokens, under the chat API's name."""
        return self.max_output_tokens

    def to_sampling_params(self) -> SamplingParams:
        return self._sampling_params(self.max_output_tokens, None)

    def template_tools(self) -> list[dict] | None:
        """The function tools in the chat-completions shape chat templates render."""
        if not self.tools:
            return None
        return [{"type": "function", "function": {
            "name": tool.name, **({"description": tool.description} if tool.description is not None else {}),
            "parameters": tool.parameters if tool.parameters is not None else {"type": "object", "properties": {}}}}
            for tool in self.tools]

    def _chat_tools(self) -> list[ChatCompletionTool]:
        return [ChatCompletionTool(function=tool.model_dump(exclude={"type"}, exclude_none=True))
                for tool in self.tools]

    def _named_choice(self) -> NamedToolChoice | None:
        if isinstance(self.tool_choice, ToolChoiceObject):
            return NamedToolChoice(function={"name": self.tool_choice.name})
        return None

    def chat_tool_fields(self, parse_auto: bool) -> "ChatToolFields":
        """The tool fields as the chat path reads them. Without the server's auto parsing (`parse_auto` false:
        no --enable-auto-tool-choice and --tool-call-parser) "auto", this API's default, renders the tools and
        leaves the text unparsed, where chat completions would refuse the request."""
        choice = self._named_choice() or self.tool_choice
        if not self.tools or (choice == "auto" and not parse_auto):
            choice = "none"
        # parameters as given: a tool without them gets the grammar's "no arguments", not an open object
        return ChatToolFields([tool.template_dict() for tool in self._chat_tools()], choice, self.parallel_tool_calls,
                              self.chat_template_kwargs)

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for what this server refuses rather than ignores, or None."""
        if self.background:
            return "background", ("background responses are not supported: send the request with background false "
                                  "(and stream: true to read the answer as it is generated)")
        if self.conversation is not None:
            return "conversation", "conversation objects are not supported; continue with previous_response_id"
        if self.truncation == "auto":
            return "truncation", ("truncation 'auto' is not supported: the server does not drop input items; a "
                                  "context that is too long is a 400 (context_length_exceeded)")
        return None

    def input_items(self) -> list[dict]:
        """The input as canonical items, each with an id."""
        if isinstance(self.input, str):
            return [message_item("user", self.input)]
        return [canonical_item(item) for item in self.input]


@dataclass
class ChatToolFields:
    """A Responses request's tools under the chat API's names: what the chat path's output-parser and tool-grammar
    builders (server/admission.py) read from a chat request."""
    tools: list[dict]
    tool_choice: str | NamedToolChoice
    parallel_tool_calls: bool
    chat_template_kwargs: dict | None

    def tool_dicts(self) -> list[dict]:
        return self.tools

    def resolved_tool_choice(self) -> str | NamedToolChoice:
        return self.tool_choice


def message_item(role: str, text: str, item_id: str | None = None) -> dict:
    part_type = "output_text" if role == "assistant" else "input_text"
    part = {"type": part_type, "text": text, **({"annotations": []} if role == "assistant" else {})}
    return {"id": item_id or random_id("msg"), "type": "message", "role": role, "content": [part],
            "status": "completed"}


def canonical_item(item: MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem) -> dict:
    if isinstance(item, MessageItem):
        if isinstance(item.content, str):
            return message_item(item.role, item.content, item.id)
        assistant = item.role == "assistant"
        parts = [{"type": "refusal", "refusal": part.refusal} if part.type == "refusal" else
                 {"type": "output_text" if assistant else "input_text", "text": part.text,
                  **({"annotations": []} if assistant else {})} for part in item.content]
        return {"id": item.id or random_id("msg"), "type": "message", "role": item.role, "content": parts,
                "status": "completed"}
    if isinstance(item, FunctionCallItem):
        return {"id": item.id or random_id("fc"), "type": "function_call", "call_id": item.call_id,
                "name": item.name, "arguments": item.arguments, "status": "completed"}
    if isinstance(item, FunctionCallOutputItem):
        output = item.output if isinstance(item.output, str) else [
            {"type": "input_text", "text": part.plain_text()} for part in item.output]
        return {"id": item.id or random_id("fco"), "type": "function_call_output", "call_id": item.call_id,
                "output": output, "status": "completed"}
    return {"id": item.id or random_id("rs"), "type": "reasoning",
            "summary": [part.model_dump() for part in item.summary],
            **({"content": [part.model_dump() for part in item.content]} if item.content is not None else {}),
            **({"encrypted_content": item.encrypted_content} if item.encrypted_content is not None else {})}


# ---------------------------------------------------------------- items → chat messages
def _parts_text(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("refusal", "") if part["type"] == "refusal" else part.get("text", "") for part in content)


def _template_arguments(arguments: str):
    """Chat templates render `arguments` as an object (`| tojson`), as transformers' convention has it; text that
    is not a JSON object stays text."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value if isinstance(value, dict) else arguments


def chat_messages(items: list[dict], instructions: str | None) -> list[dict]:
    """The conversation as chat-template messages: `instructions` the system message; a function_call joins the
    assistant message before it (parallel calls share one message); a function_call_output is a `tool` message;
    a reasoning item's text rides on the next assistant message as `reasoning_content`, which templates that
    know it render and others ignore."""
    messages = [{"role": "system", "content": instructions}] if instructions else []
    names: dict[str, str] = {}
    reasoning: str | None = None
    for item in items:
        kind = item["type"]
        if kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning = "".join(part["text"] for part in parts) or None
        elif kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            message = {"role": role, "content": _parts_text(item["content"])}
            if role == "assistant" and reasoning is not None:
                message["reasoning_content"], reasoning = reasoning, None
            messages.append(message)
        elif kind == "function_call":
            names[item["call_id"]] = item["name"]
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": _template_arguments(item["arguments"])}}
            last = messages[-1] if messages else None
            if last is None or last["role"] != "assistant":
                last = {"role": "assistant", "content": ""}
                if reasoning is not None:
                    last["reasoning_content"], reasoning = reasoning, None
                messages.append(last)
            last.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            message = {"role": "tool", "tool_call_id": item["call_id"], "content": _parts_text(item["output"])}
            if item["call_id"] in names:
                message["name"] = names[item["call_id"]]
            messages.append(message)
    return messages


# ---------------------------------------------------------------- the response object
def response_status(finish_reason: str | None) -> tuple[str, dict | None]:
    """(status, incomplete_details) of a response whose answer ended with `finish_reason`."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def usage(input_tokens: int, output_tokens: int, cached_tokens: int, reasoning_tokens: int = 0) -> dict:
    return {"input_tokens": input_tokens, "output_tokens": output_tokens, "total_tokens": input_tokens + output_tokens,
            "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens}}


def response_object(response_id: str, model: str, body: ResponsesRequest, created_at: int, status: str,
                    output: list[dict], usage_: dict | None = None, incomplete_details: dict | None = None,
                    error: dict | None = None) -> dict:
    """The Response: what the client sent, echoed as OpenAI echoes it, and the answer."""
    text_format = body.text.format if body.text is not None and body.text.format is not None else None
    return {
        "id": response_id, "object": "response", "created_at": created_at, "model": model, "status": status,
        "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
        "output": output, "usage": usage_, "incomplete_details": incomplete_details, "error": error,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {}, "parallel_tool_calls": body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id, "temperature": body.temperature, "top_p": body.top_p,
        "tool_choice": body.tool_choice if isinstance(body.tool_choice, str) else body.tool_choice.model_dump(),
        "tools": [tool.model_dump(exclude_none=True) for tool in body.tools],
        "text": {"format": text_format.model_dump(by_alias=True, exclude_none=True) if text_format is not None
                 else {"type": "text"}},
        "truncation": body.truncation, "user": body.user, "store": body.store, "background": False,
        "reasoning": body.reasoning}


def item_page(items: list[dict], limit: int, order: str, after: str | None) -> dict:
    """One page of `GET /v1/responses/{id}/input_items`: OpenAI's cursor list."""
    ordered = list(reversed(items)) if order == "desc" else list(items)
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise InvalidArgument("after", f"after: no input item {after!r} in this response")
        ordered = ordered[ids.index(after) + 1:]
    page = ordered[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(ordered) > limit}
