"""The router's map of stored responses to backends: bounded oldest-first, owned per client key, and the id read
from a streamed answer's first event however the bytes are split (the event format is the one `serval serve`
sends, built with serval.openai.sse and checked against the openai SDK's typed event)."""
from __future__ import annotations

import json

from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from serval.openai.response_output import EventSequence
from serval.openai.responses import ResponsesRequest, response_object
from serval.openai.sse import sse
from serval.router.request_info import route_request
from serval.router.responses import (MAX_ID_SCAN_BYTES, ResponseHome, ResponseHomes, StreamIdReader, client_owner,
                                     whole_response_id)


def created_event_bytes(response_id: str) -> bytes:
    body = ResponsesRequest.model_validate({"input": "hi"})
    event = EventSequence().event("response.created",
                                  response=response_object(response_id, "m", body, 1, "in_progress", []))
    TypeAdapter(ResponseStreamEvent).validate_python(event)
    return sse(event).encode()


def test_homes_are_bounded_oldest_first_and_per_owner():
    homes = ResponseHomes(capacity=2)
    homes.remember("r1", ResponseHome("a", "alice"))
    homes.remember("r2", ResponseHome("b", "alice"))
    homes.remember("r1", ResponseHome("a", "alice"))  # refreshed: r2 is now the oldest
    homes.remember("r3", ResponseHome("b", "bob"))
    assert len(homes) == 2 and not homes.is_known("r2")
    assert homes.find("r1", "alice") == ResponseHome("a", "alice")
    assert homes.find("r3", "alice") is None and homes.find("r3", "bob").backend == "b"
    homes.forget("r1")
    assert homes.find("r1", "alice") is None


def test_the_owner_is_the_hashed_key_only_when_the_router_has_keys():
    assert client_owner("Bearer sk-1", keyed=True) == client_owner("bearer  sk-1 ", keyed=True) != ""
    assert client_owner("Bearer sk-1", keyed=True) != client_owner("Bearer sk-2", keyed=True)
    assert "sk-1" not in client_owner("Bearer sk-1", keyed=True)
    assert client_owner("Bearer sk-1", keyed=False) == client_owner(None, keyed=True) == ""


def test_stream_id_is_read_across_any_split():
    stream = created_event_bytes("resp-42") + sse({"type": "response.in_progress"}).encode()
    for cut in range(1, len(stream)):
        reader = StreamIdReader()
        found = [reader.feed(stream[:cut]), reader.feed(stream[cut:])]
        assert [item for item in found if item is not None] == ["resp-42"], cut
        assert reader.done and reader.feed(stream) is None


def test_a_stream_without_the_id_is_given_up_on():
    reader = StreamIdReader()
    assert reader.feed(b"data: " + b"x" * (MAX_ID_SCAN_BYTES + 1)) is None and reader.done
    assert StreamIdReader().feed(b'data: {"error": {"message": "no"}}\n\n') is None


def test_whole_response_id():
    assert whole_response_id(json.dumps({"id": "resp-1", "object": "response"}).encode()) == "resp-1"
    assert whole_response_id(b"not json") is None and whole_response_id(b"[1]") is None


def test_responses_input_is_routing_text():
    info = route_request({"model": "m", "instructions": "Be brief.", "max_output_tokens": 7,
                          "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hello"}]}],
                          "text": {"format": {"type": "json_object"}}}, {})
    assert "Be brief." in info.text and "Hello" in info.text
    assert info.max_tokens == 7 and info.needs_structured_output
    assert "Hi there" in route_request({"model": "m", "input": "Hi there"}, {}).text
