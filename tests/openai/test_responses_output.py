"""The Responses output assembler with the chat API's parsers: reasoning, text and function calls become `reasoning`,
`message` and `function_call` items; the streamed events, fed Qwen3's real tokens one at a time, are the openai
SDK's typed events in OpenAI's order and rebuild exactly the whole answer's items."""
from __future__ import annotations

import json

from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from serval.openai.response_output import EventSequence, OutputAssembler
from serval.openai.responses import ResponsesRequest, response_object, usage
from serval.openai.tool_parsers.chat_output import chat_output_parser
from tests.openai.tool_parsers.streaming import qwen3_tokenizer, token_deltas

EVENTS = TypeAdapter(ResponseStreamEvent)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TEXT = "<think>Paris, so one call.</think>\n\nLet me look.\n" + CALL + "\n" + CALL.replace("Paris", "Rome")


def parser(reasoning: str | None = "qwen3", tool_choice: str = "auto"):
    return chat_output_parser("hermes", reasoning, TOOLS, tool_choice, enable_auto_tool_choice=True)


def assemble(deltas: list[str], new_parser=parser, status: str = "completed") -> tuple[OutputAssembler, list]:
    assembler = OutputAssembler(EventSequence(), new_parser())
    events = [event for delta in deltas for event in assembler.feed(delta)] + assembler.finish(status)
    return assembler, [EVENTS.validate_python(event) for event in events]


def test_reasoning_text_and_calls_are_items_of_an_sdk_response():
    assembler, _ = assemble([TEXT])
    body = ResponsesRequest.model_validate({"input": "hi", "tools": [{"type": "function", "name": "get_weather"}]})
    response = Response.model_validate(response_object("resp-1", "m", body, 1, "completed", assembler.items,
                                                       usage(10, 40, 0, 7)))
    kinds = [item.type for item in response.output]
    assert kinds == ["reasoning", "message", "function_call", "function_call"]
    assert response.output[0].content[0].text == "Paris, so one call."
    chat = parser()
    chat.feed(TEXT), chat.finish()
    assert response.output_text == chat.result().content and "Let me look." in response.output_text
    calls = response.output[2:]
    assert [json.loads(call.arguments) for call in calls] == [{"city": "Paris"}, {"city": "Rome"}]
    assert all(call.name == "get_weather" and call.call_id.startswith("call") for call in calls)
    assert calls[0].call_id != calls[1].call_id and calls[0].id != calls[1].id
    assert all(item.status == "completed" for item in response.output)
    assert response.usage.output_tokens_details.reasoning_tokens == 7
    assert assembler.reasoning_text == "Paris, so one call." and assembler.has_tool_calls


def test_streamed_token_by_token_events_are_ordered_and_rebuild_the_whole_answer():
    whole, _ = assemble([TEXT])
    streamed, events = assemble(token_deltas(qwen3_tokenizer(), TEXT))
    assert [event.sequence_number for event in events] == list(range(len(events)))
    for item in streamed.items:
        item.pop("id")
    for item in whole.items:
        item.pop("id")
    for streamed_item, whole_item in zip(streamed.items, whole.items):
        if streamed_item["type"] == "function_call":  # call ids are drawn per parse
            streamed_item.pop("call_id"), whole_item.pop("call_id")
    assert streamed.items == whole.items
    # each item: added, its deltas, its done events, output_item.done, before the next item opens
    kinds = [event.type for event in events if not event.type.endswith(".delta")]
    assert kinds == [
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.done",
        "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.done",
        "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.done", "response.output_item.done"]
    deltas: dict[str, str] = {}
    for event in events:
        if event.type.endswith(".delta"):
            deltas[event.item_id] = deltas.get(event.item_id, "") + event.delta
    done = [event for event in events if event.type == "response.output_item.done"]
    for event in done:
        item = event.item
        text = item.arguments if item.type == "function_call" else item.content[0].text
        assert deltas[item.id] == text
        assert events[[e.sequence_number for e in events].index(event.sequence_number)].output_index == \
            [e.item.id for e in done].index(item.id)
    added = [event for event in events if event.type == "response.output_item.added"]
    assert all(event.item.status == "in_progress" for event in added)
    assert [event.item.name for event in added if event.item.type == "function_call"] == ["get_weather"] * 2


def test_a_cut_off_thought_is_all_reasoning_and_its_item_incomplete():
    assembler, events = assemble(["<think>still thin", "king"], status="incomplete")
    assert [item["type"] for item in assembler.items] == ["reasoning"]
    assert assembler.items[0]["content"][0]["text"] == "still thinking"
    assert assembler.items[0]["status"] == "incomplete" and events[-1].item.status == "incomplete"


def test_without_parsers_the_text_is_one_message_as_sent():
    plain = lambda: chat_output_parser(None, None, TOOLS, "none")  # noqa: E731
    assembler, events = assemble(["<think>x</think>", CALL], plain)
    assert [item["type"] for item in assembler.items] == ["message"]
    assert assembler.items[0]["content"][0]["text"] == "<think>x</think>" + CALL
    nothing, _ = assemble([], plain)
    assert nothing.items[0]["type"] == "message" and nothing.items[0]["content"][0]["text"] == ""


def test_a_call_alone_has_no_empty_message():
    assembler, _ = assemble([CALL], lambda: parser(None, "required"))
    assert [item["type"] for item in assembler.items] == ["function_call"]
