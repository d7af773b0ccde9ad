"""A response's output items, assembled from the model's text through the chat API's output parser, and the typed
stream events that build them, numbered in the order they are sent.

The parser (serval/openai/tool_parsers/chat_output.py) splits each text delta into reasoning, content and tool-call
deltas; each kind is one output item, and a delta of another kind closes the open item and opens the next:

    reasoning ──► `reasoning` item      output_item.added, content_part.added (reasoning_text),
                                        reasoning_text.delta…, reasoning_text.done, content_part.done, output_item.done
    content   ──► `message` item        output_item.added, content_part.added (output_text),
                                        output_text.delta…, output_text.done, content_part.done, output_item.done
    tool call ──► `function_call` item  output_item.added, function_call_arguments.delta…, .done, output_item.done

A whole (non-streamed) answer goes through the same steps and drops the events, so the two cannot disagree. The
event names and item shapes are those of the `openai` package's `types/responses/`. Torch-free.
"""
from __future__ import annotations

from serval.openai.protocol import random_id
from serval.openai.tool_parsers.chat_output import ChatDelta, ChatOutputParser


class EventSequence:
    """Stream events numbered in the order they are sent (`sequence_number`, from 0)."""

    def __init__(self) -> None:
        self.next_number = 0

    def event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.next_number, **fields}
        self.next_number += 1
        return event


def _text_part(kind: str, text: str) -> dict:
    if kind == "reasoning":
        return {"type": "reasoning_text", "text": text}
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class OutputAssembler:
    """One response's output: feed it the answer's text deltas, then `finish`; `items` is the output and
    `reasoning_text` what the reasoning parser split off (for usage's reasoning_tokens)."""

    def __init__(self, events: EventSequence, parser: ChatOutputParser | None = None) -> None:
        self.events = events
        self.parser = parser if parser is not None else ChatOutputParser()
        self.items: list[dict] = []
        self.reasoning_text = ""
        self._open: dict | None = None  # the item deltas go to; reasoning and message items keep their text here
        self._open_text = ""
        self._call_items: dict[int, dict] = {}  # the parser's call index -> its function_call item

    @property
    def has_tool_calls(self) -> bool:
        return bool(self._call_items)

    def feed(self, text: str) -> list[dict]:
        """The events for `text`, the next text of the answer."""
        if self.parser.reasoning is None and self.parser.tools is None:
            return self._content(text)  # nothing to parse: the text is the answer, as sent
        return self._parsed(self.parser.feed(text))

    def finish(self, item_status: str) -> list[dict]:
        """The closing events; `items` is then the whole output (an empty message when the model said nothing)."""
        events = self._parsed(self.parser.finish())
        if not self.items:
            events += self._begin("message")
        return events + self._close(item_status)

    # ---- routing parsed deltas to items
    def _parsed(self, delta: ChatDelta) -> list[dict]:
        events: list[dict] = []
        if delta.reasoning:
            events += self._text("reasoning", delta.reasoning)
            self.reasoning_text += delta.reasoning
        if delta.content:
            events += self._content(delta.content)
        for call in delta.tool_calls:
            if call.id is not None:
                events += self._close("completed") + self._begin_call(call.index, call.id, call.function.name)
            if call.function.arguments:
                events += self._arguments(call.index, call.function.arguments)
        return events

    def _content(self, text: str) -> list[dict]:
        return self._text("message", text) if text else []

    def _text(self, kind: str, text: str) -> list[dict]:
        events = [] if self._open is not None and self._open["type"] == kind else self._close("completed")
        if self._open is None:
            events += self._begin(kind)
        self._open_text += text
        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        return events + [self.events.event(name, item_id=self._open["id"], output_index=len(self.items) - 1,
                                           content_index=0, delta=text, **extra)]

    def _begin(self, kind: str) -> list[dict]:
        if kind == "reasoning":
            item = {"id": random_id("rs"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
        else:
            item = {"id": random_id("msg"), "type": "message", "role": "assistant", "content": [],
                    "status": "in_progress"}
        self._open, self._open_text = item, ""
        self.items.append(item)
        index = len(self.items) - 1
        return [self.events.event("response.output_item.added", output_index=index, item=dict(item)),
                self.events.event("response.content_part.added", item_id=item["id"], output_index=index,
                                  content_index=0, part=_text_part(kind, ""))]

    def _begin_call(self, call_index: int, call_id: str, name: str) -> list[dict]:
        item = {"id": random_id("fc"), "type": "function_call", "call_id": call_id, "name": name, "arguments": "",
                "status": "in_progress"}
        self._call_items[call_index] = item
        self._open = item
        self.items.append(item)
        return [self.events.event("response.output_item.added", output_index=len(self.items) - 1, item=dict(item))]

    def _arguments(self, call_index: int, fragment: str) -> list[dict]:
        item = self._call_items[call_index]
        item["arguments"] += fragment
        return [self.events.event("response.function_call_arguments.delta", item_id=item["id"],
                                  output_index=self.items.index(item), delta=fragment)]

    def _close(self, status: str) -> list[dict]:
        """The closing events of the open item, if any."""
        item, self._open = self._open, None
        if item is None:
            return []
        index = self.items.index(item)
        item["status"] = status
        if item["type"] == "function_call":
            return [self.events.event("response.function_call_arguments.done", item_id=item["id"],
                                      output_index=index, arguments=item["arguments"]),
                    self.events.event("response.output_item.done", output_index=index, item=dict(item))]
        kind = item["type"]
        part = _text_part(kind, self._open_text)
        item["content"] = [part]
        if kind == "reasoning":
            done = self.events.event("response.reasoning_text.done", item_id=item["id"], output_index=index,
                                     content_index=0, text=self._open_text)
        else:
            done = self.events.event("response.output_text.done", item_id=item["id"], output_index=index,
                                     content_index=0, text=self._open_text, logprobs=[])
        return [done, self.events.event("response.content_part.done", item_id=item["id"], output_index=index,
                                        content_index=0, part=part),
                self.events.event("response.output_item.done", output_index=index, item=dict(item))]
