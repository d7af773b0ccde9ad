"""The Responses API through real `serval serve` processes and the official openai client: whole and streamed
answers parsed by the SDK's own typed models, stored conversations continued with previous_response_id (the
prefix cache hitting), retrieval, deletion and input items, a restart with --responses-store, per-key ownership
under a guard policy, structured output through text.format, and bad input.

Prompt lengths are checked against transformers' rendering of the same conversation with the served tokenizer's
chat template: the outside reference for "the items became these messages".
"""
from __future__ import annotations

import json
import subprocess
import sys

import httpx
import jsonschema
import openai
import pytest
import transformers
from openai.types.responses import Response, ResponseItem, ResponseStreamEvent
from pydantic import TypeAdapter

from serval.guard.keys import hash_key
from tests.e2e.faulty_serve import KILL_ENGINE_MARKER, SECRET
from tests.e2e.server import REPO_ROOT, RemoteServer, tiny_model_dir

MODEL = "tiny"
BLOCK_SIZE = 16
KEYS = {"alice": "sk-serval-alice", "bob": "sk-serval-bob"}
POLICY = ("keys:\n" + "".join(f"  - {{id: {name}, sha256: {hash_key(key)}}}\n" for name, key in KEYS.items())
          + "output:\n  deny:\n    - {name: halt, pattern: forbidden, action: stop}\n")
EVENTS = TypeAdapter(ResponseStreamEvent)
ITEMS = TypeAdapter(ResponseItem)
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
          "required": ["answer"], "additionalProperties": False}
WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def server_args(*extra: str) -> list[str]:
    return ["--model", tiny_model_dir(), "--max-model-len", "512", "--served-model-name", MODEL,
            "--max-num-seqs", "8", *extra]


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy") / "policy.yaml"
    path.write_text(POLICY)
    return path


@pytest.fixture(scope="module")
def server(policy_path):
    remote = RemoteServer(server_args("--policy", str(policy_path)), api_key=KEYS["alice"])
    yield remote
    remote.close()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def bob(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS["bob"], max_retries=0)


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(tiny_model_dir())


def template_tokens(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> int:
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    return len(tokenizer.encode(text, add_special_tokens=False))


def raw_post(server, body: dict, key: str = "alice") -> httpx.Response:
    return httpx.post(server.url + "/v1/responses", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEYS[key]}"})


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def assert_alive(server, client) -> None:
    assert httpx.get(server.url + "/health").status_code == 200
    assert client.responses.create(model=MODEL, input="still there?", max_output_tokens=2).status == "incomplete"


# ---------------------------------------------------------------- create
def test_create_is_an_sdk_response_of_the_templated_input(server, client, tokenizer):
    body = {"model": MODEL, "input": "Tell me a story.", "instructions": "Be brief.", "max_output_tokens": 6,
            "temperature": 0, "metadata": {"team": "a"}, "user": "u-1"}
    raw = raw_post(server, body)
    assert raw.status_code == 200, raw.text
    response = Response.model_validate(raw.json())  # strict: every field the SDK's model has, typed
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 6 and response.usage.output_tokens_details.reasoning_tokens == 0
    assert response.usage.input_tokens == template_tokens(
        tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}])
    assert response.usage.total_tokens == response.usage.input_tokens + 6
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "incomplete"
    assert response.metadata == {"team": "a"} and response.user == "u-1" and response.instructions == "Be brief."
    # The same conversation through the chat API: the same greedy text.
    chat = client.chat.completions.create(model=MODEL, max_tokens=6, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}])
    assert response.output_text == chat.choices[0].message.content
    assert client.responses.create(**body).output_text == response.output_text


def test_text_format_json_schema_gives_valid_json_and_completes(client):
    response = client.responses.create(model=MODEL, input="Is the sky blue?", max_output_tokens=64, text={
        "format": {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}})
    assert response.status == "completed" and response.incomplete_details is None
    jsonschema.validate(json.loads(response.output_text), SCHEMA)
    assert response.text.format.type == "json_schema"
    json_object = client.responses.create(model=MODEL, input="Some JSON:", max_output_tokens=48,
                                          text={"format": {"type": "json_object"}})
    if json_object.status == "completed":
        assert isinstance(json.loads(json_object.output_text), dict)
    else:  # cut by the limit: still a JSON object's beginning
        assert json_object.output_text.lstrip().startswith("{")


def test_an_output_rail_stop_is_incomplete_with_content_filter(server, client):
    """The random model says what a `choice` constraint forces; the policy's output rail stops it mid-text."""
    forced = {"structured_outputs": {"choice": ["this part is fine but forbidden words follow"]}}
    whole = client.responses.create(model=MODEL, input="say it", max_output_tokens=40, extra_body=forced)
    assert whole.status == "incomplete" and whole.incomplete_details.reason == "content_filter"
    assert whole.output_text == "this part is fine but "
    events = list(client.responses.create(model=MODEL, input="say it", max_output_tokens=40, stream=True,
                                          extra_body=forced))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "content_filter"
    assert events[-1].response.output_text == "this part is fine but "


# ---------------------------------------------------------------- streaming
EXPECTED_ORDER = ["response.created", "response.in_progress", "response.output_item.added",
                  "response.content_part.added"]
CLOSING_ORDER = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


def check_event_order(events: list, final: str) -> None:
    kinds = [event.type for event in events]
    assert kinds[:4] == EXPECTED_ORDER, kinds
    assert kinds[-4:] == CLOSING_ORDER + [final], kinds
    assert set(kinds[4:-4]) == {"response.output_text.delta"}, kinds
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert events[-4].text == deltas == events[-1].response.output_text
    assert len({event.response.id for event in events if hasattr(event, "response")}) == 1


def test_stream_events_are_typed_and_ordered(server, client):
    body = {"model": MODEL, "input": "Count to ten.", "max_output_tokens": 7, "temperature": 0}
    events = list(client.responses.create(stream=True, **body))
    check_event_order(events, "response.incomplete")
    final = events[-1].response
    assert final.incomplete_details.reason == "max_output_tokens" and final.usage.output_tokens == 7
    assert final.output_text == client.responses.create(**body).output_text  # streamed = whole
    assert client.responses.retrieve(final.id).model_dump() == final.model_dump()
    # The raw wire, each event through the SDK's union of stream events in pydantic's strict validation.
    with httpx.stream("POST", server.url + "/v1/responses", json={**body, "stream": True}, timeout=120,
                      headers=server.headers) as raw:
        lines = [line for line in raw.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    typed = [EVENTS.validate_python(json.loads(line[len("data: "):])) for line in lines[:-1]]
    check_event_order(typed, "response.incomplete")


def test_stream_helper_gets_the_completed_response(client):
    with client.responses.stream(model=MODEL, input="Yes or no?", max_output_tokens=64, text={
            "format": {"type": "json_schema", "name": "answer", "schema": SCHEMA}}) as stream:
        events = list(stream)
        final = stream.get_final_response()
    check_event_order(events, "response.completed")
    assert final.status == "completed"
    jsonschema.validate(json.loads(final.output_text), SCHEMA)


# ---------------------------------------------------------------- stored conversations
def test_previous_response_id_over_three_turns_hits_the_prefix_cache(server, client, tokenizer):
    hits_before = server.metric("serval:prefix_cache_hits_total")
    first = client.responses.create(model=MODEL, input="My name is Ada. Remember it, please, for later.",
                                    instructions="You are terse.", max_output_tokens=5, temperature=0)
    second = client.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                     max_output_tokens=5, temperature=0)
    third = client.responses.create(model=MODEL, input="And again?", previous_response_id=second.id,
                                    max_output_tokens=5, temperature=0)
    assert third.previous_response_id == second.id
    # The previous prompt's full blocks are reused (only its last block can differ, where the answer's text is
    # re-tokenized next to the template's markup).
    for previous, turn in ((first, second), (second, third)):
        reusable = (previous.usage.input_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE
        assert turn.usage.input_tokens_details.cached_tokens >= reusable > 0
    hits = server.metric("serval:prefix_cache_hits_total") - hits_before
    assert hits >= second.usage.input_tokens_details.cached_tokens + third.usage.input_tokens_details.cached_tokens
    # Turn 3's context: both earlier turns, their answers, and no instructions (OpenAI does not carry them over).
    assert third.usage.input_tokens == template_tokens(tokenizer, [
        {"role": "user", "content": "My name is Ada. Remember it, please, for later."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
        {"role": "assistant", "content": second.output_text},
        {"role": "user", "content": "And again?"}])


def test_retrieve_input_items_and_delete(server, client):
    created = client.responses.create(model=MODEL, max_output_tokens=3, input=[
        {"role": "developer", "content": "Answer in French."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"},
                                                        {"type": "input_text", "text": " there"}]}])
    assert client.responses.retrieve(created.id).model_dump() == created.model_dump()
    items = client.responses.input_items.list(created.id)
    assert [item.role for item in items.data] == ["user", "developer"]  # newest first, as OpenAI lists them
    raw = httpx.get(f"{server.url}/v1/responses/{created.id}/input_items", params={"order": "asc"},
                    headers=server.headers).json()
    for item in raw["data"]:
        ITEMS.validate_python(item)
    assert [part["text"] for part in raw["data"][1]["content"]] == ["Hello", " there"]
    first_page = client.responses.input_items.list(created.id, order="asc", limit=1)
    assert first_page.has_more and first_page.data[0].role == "developer"
    rest = client.responses.input_items.list(created.id, order="asc", limit=1, after=first_page.data[0].id)
    assert not rest.has_more and rest.data[0].role == "user"
    # HTTP metrics label the route's template, not each id.
    assert server.metric("serval:http_requests_total", method="GET", handler="/v1/responses/{response_id}",
                         status="200") >= 1
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.retrieve(created.id)
    assert missing.value.body["code"] == "not_found"
    assert_openai_error(httpx.delete(f"{server.url}/v1/responses/{created.id}", headers=server.headers), 404)
    assert_openai_error(httpx.get(f"{server.url}/v1/responses/{created.id}/input_items", headers=server.headers),
                        404)


def test_store_false_is_not_kept(server, client):
    unstored = client.responses.create(model=MODEL, input="Forget this.", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    error = assert_openai_error(raw_post(server, {"model": MODEL, "input": "x", "previous_response_id": unstored.id}),
                                404, "previous_response_id")
    assert unstored.id in error["message"]


def test_function_call_items_render_as_tool_messages(server, client, tokenizer):
    """A function-call round trip's second half: the call and its output go back in as items."""
    items = [{"role": "user", "content": "Weather in Paris?"},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "22 C, sunny"}]
    response = client.responses.create(model=MODEL, input=items, tools=[WEATHER_TOOL], max_output_tokens=4,
                                       tool_choice="auto")
    assert response.tools[0].name == "get_weather" and response.tool_choice == "auto"
    assert response.usage.input_tokens == template_tokens(tokenizer, [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "22 C, sunny"}],
        tools=[{"type": "function", "function": {key: WEATHER_TOOL[key]
                                                 for key in ("name", "description", "parameters")}}])
    stored = client.responses.input_items.list(response.id, order="asc").data
    assert [item.type for item in stored] == ["message", "function_call", "function_call_output"]
    assert stored[1].call_id == "call_1" and stored[2].output == "22 C, sunny"
    follow_up = client.responses.create(model=MODEL, input="Thanks!", previous_response_id=response.id,
                                        max_output_tokens=2)
    assert follow_up.usage.input_tokens_details.cached_tokens > 0


def test_a_key_cannot_see_another_keys_responses(server, client, bob):
    mine = client.responses.create(model=MODEL, input="Private note.", max_output_tokens=2)
    for attempt in (lambda: bob.responses.retrieve(mine.id), lambda: bob.responses.delete(mine.id),
                    lambda: bob.responses.input_items.list(mine.id)):
        with pytest.raises(openai.NotFoundError):
            attempt()
    with pytest.raises(openai.NotFoundError) as continued:
        bob.responses.create(model=MODEL, input="Go on.", previous_response_id=mine.id, max_output_tokens=2)
    assert continued.value.body["param"] == "previous_response_id"
    assert client.responses.retrieve(mine.id).id == mine.id  # still there for its owner
    theirs = bob.responses.create(model=MODEL, input="Bob's note.", max_output_tokens=2)
    assert bob.responses.retrieve(theirs.id).id == theirs.id
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(theirs.id)
    assert_openai_error(httpx.get(f"{server.url}/v1/responses/{mine.id}"), 401)


# ---------------------------------------------------------------- bad input
def test_bad_input_is_an_openai_4xx_and_the_server_stays_up(server, client):
    base = {"model": MODEL, "max_output_tokens": 2}
    assert_openai_error(raw_post(server, {**base, "input": ""}), 400, "input")
    assert_openai_error(raw_post(server, {**base, "input": []}), 400, "input")
    assert_openai_error(raw_post(server, {**base}), 400, "input")
    error = assert_openai_error(raw_post(server, {**base, "input": "word " * 600}), 400, "input")
    assert error["code"] == "context_length_exceeded"
    error = assert_openai_error(raw_post(server, {"model": MODEL, "input": "hi", "max_output_tokens": 600}), 400,
                                "max_output_tokens")
    assert error["code"] == "context_length_exceeded"
    error = assert_openai_error(raw_post(server, {**base, "input": "hi", "previous_response_id": "resp-nope"}), 404,
                                "previous_response_id")
    assert "resp-nope" in error["message"]
    assert_openai_error(raw_post(server, {**base, "input": "hi", "background": True}), 400, "background")
    assert_openai_error(raw_post(server, {**base, "input": "hi", "tool_choice": "required",
                                          "tools": [WEATHER_TOOL]}), 400, "tool_choice")
    assert_openai_error(raw_post(server, {**base, "input": "hi", "tools": [{"type": "web_search"}]}), 400, "tools")
    assert_openai_error(raw_post(server, {**base, "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "http://x/y.png"}]}]}), 400)
    assert_openai_error(raw_post(server, {**base, "input": [{"type": "item_reference", "id": "x"}]}), 400)
    assert_openai_error(raw_post(server, {**base, "input": "hi", "temperature": "hot"}), 400, "temperature")
    assert_openai_error(raw_post(server, {**base, "input": "hi", "model": "gpt-9"}), 404, "model")
    with pytest.raises(openai.NotFoundError) as unknown:
        client.responses.retrieve("resp-unknown")
    assert set(unknown.value.body) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel("resp-unknown")
    assert_openai_error(httpx.get(f"{server.url}/v1/responses/x/input_items", params={"limit": 0},
                                  headers=server.headers), 400, "limit")
    assert_alive(server, client)


def test_openapi_documents_the_responses_body(server):
    document = httpx.get(server.url + "/openapi.json", headers=server.headers, timeout=30).json()
    body = document["paths"]["/v1/responses"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ResponsesRequest"}
    assert {"input", "previous_response_id", "text"} <= set(document["components"]["schemas"]["ResponsesRequest"][
        "properties"])


# ---------------------------------------------------------------- persistence
def test_a_restart_with_responses_store_keeps_the_conversation(tmp_path, tokenizer):
    path = str(tmp_path / "responses.sqlite")
    first_server = RemoteServer(server_args("--responses-store", path))
    try:
        first = first_server.client().responses.create(model=MODEL, input="Remember: blue.", max_output_tokens=4,
                                                       temperature=0)
    finally:
        first_server.close()
    second_server = RemoteServer(server_args("--responses-store", path))
    try:
        client = second_server.client()
        assert client.responses.retrieve(first.id).model_dump() == first.model_dump()
        follow_up = client.responses.create(model=MODEL, input="Which colour?", previous_response_id=first.id,
                                            max_output_tokens=4, temperature=0)
        assert follow_up.usage.input_tokens == template_tokens(tokenizer, [
            {"role": "user", "content": "Remember: blue."}, {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "Which colour?"}])
    finally:
        second_server.close()


def test_an_engine_failure_mid_stream_is_response_failed():
    remote = RemoteServer(server_args(), module="tests.e2e.faulty_serve")
    try:
        with httpx.stream("POST", remote.url + "/v1/responses", timeout=120, json={
                "model": MODEL, "input": KILL_ENGINE_MARKER, "max_output_tokens": 50, "stream": True}) as raw:
            assert raw.status_code == 200
            lines = [line for line in raw.iter_lines() if line.startswith("data: ")]
    finally:
        remote.close()
    assert lines[-1] == "data: [DONE]" and SECRET not in "".join(lines)
    events = [EVENTS.validate_python(json.loads(line[len("data: "):])) for line in lines[:-1]]
    assert [event.type for event in events][:2] == ["response.created", "response.in_progress"]
    assert events[-1].type == "response.failed" and events[-1].response.status == "failed"
    assert events[-1].response.error.code == "server_error"
    assert [event.sequence_number for event in events] == list(range(len(events)))


def test_a_store_path_that_cannot_be_opened_exits_2_naming_the_flag(tmp_path):
    result = subprocess.run([sys.executable, "-m", "serval.cli", "serve", "--port", "1", *server_args(
        "--responses-store", str(tmp_path / "no-such-dir" / "store.sqlite"))], cwd=REPO_ROOT, capture_output=True,
        text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--responses-store" in result.stderr
