"""The SSE helpers: event framing, the error event, the sent-state tracker, and the response that always closes
its body however the client leaves."""
import asyncio
import json

from starlette.requests import ClientDisconnect

from serval.openai.errors import APIError
from serval.openai.protocol import UsageInfo
from serval.openai.sse import DONE, ClosingStreamingResponse, SentState, error_event, sse
from serval.outputs import CompletionOutput, Logprob


def parse(event: str):
    assert event.startswith("data: ") and event.endswith("\n\n")
    return json.loads(event[len("data: "):-2])


def test_sse_frames_models_and_dicts_alike():
    usage = UsageInfo.of(3, 4)
    assert parse(sse(usage)) == usage.model_dump()
    assert parse(sse({"a": [1, "é"]})) == {"a": [1, "é"]}
    assert DONE == "data: [DONE]\n\n"


def test_error_event_is_openais_error_body():
    error = APIError(400, "bad seed", param="seed")
    assert parse(error_event(error)) == {"error": {"message": "bad seed", "type": "invalid_request_error",
                                                   "param": "seed", "code": None}}


def completion(text: str, token_ids: list[int], finish_reason=None, logprobs=None) -> CompletionOutput:
    return CompletionOutput(index=0, text=text, token_ids=token_ids, cumulative_logprob=None, logprobs=logprobs,
                            finish_reason=finish_reason)


def test_sent_state_sends_only_what_is_new_and_nothing_after_the_end():
    sent = SentState()
    assert sent.first(0)
    positions = [{5: Logprob(-0.1)}, {6: Logprob(-0.2)}, {7: Logprob(-0.3)}]
    first = sent.delta(0, completion("He", [5], logprobs=positions[:1]))
    assert (first.text, first.token_ids, first.logprobs) == ("He", [5], positions[:1])
    assert not sent.first(0)
    assert sent.delta(0, completion("He", [5], logprobs=positions[:1])) is None  # nothing new
    # A token whose text the detokenizer holds back still counts as new.
    held = sent.delta(0, completion("He", [5, 6], logprobs=positions[:2]))
    assert (held.text, held.token_ids, held.logprobs) == ("", [6], positions[1:2])
    last = sent.delta(0, completion("Hello", [5, 6, 7], "stop", logprobs=positions))
    assert (last.text, last.token_ids) == ("llo", [7])
    assert sent.delta(0, completion("Hello!", [5, 6, 7, 8], "stop")) is None
    assert sent.first(1) and sent.delta(1, completion("", [], "length")).text == ""  # an empty finish is sent


def test_closing_response_closes_the_body_and_calls_on_close_when_the_client_leaves():
    events = []

    async def body():
        try:
            for i in range(100):
                yield f"data: {i}\n\n"
        finally:
            events.append("body closed")

    async def on_close():
        events.append("on_close")

    async def run():
        sent = []

        async def send(message):
            sent.append(message)
            if len(sent) == 3:  # the start line and two chunks, then the connection breaks
                raise OSError("client went away")

        async def receive():
            await asyncio.Event().wait()

        response = ClosingStreamingResponse(body(), on_close)
        assert response.media_type == "text/event-stream"
        try:
            await response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send)
        except (OSError, ClientDisconnect):  # Starlette reports the broken send as a disconnect
            pass
        return sent

    sent = asyncio.run(run())
    assert len(sent) == 3
    assert events == ["body closed", "on_close"]
