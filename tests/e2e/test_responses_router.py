"""The Responses API through `serval route` in front of two real `serval serve` backends that alternate
(round_robin): every lookup, deletion and continuation of a stored response reaches the backend that stores it,
whichever backend the policy would pick next; one client key cannot reach another's responses; unknown ids are
OpenAI-shaped 404s."""
from __future__ import annotations

import httpx
import openai
import pytest

from tests.e2e.router_support import RouterProcess, start_servers
from tests.e2e.server import tiny_model_dir

KEYS = ("sk-router-alice", "sk-router-bob")


@pytest.fixture(scope="module")
def cluster():
    tiny = ["--model", tiny_model_dir(), "--max-model-len", "512", "--served-model-name", "tiny"]
    a, b = start_servers([tiny, tiny])
    router = RouterProcess({
        "backends": [{"name": "a", "url": a.url, "models": ["tiny"], "engine": "serval", "scrape_metrics": False},
                     {"name": "b", "url": b.url, "models": ["tiny"], "engine": "serval", "scrape_metrics": False}],
        "models": [{"name": "tiny", "backends": ["a", "b"], "policy": "round_robin"}],
        "api_keys": list(KEYS)})
    yield router, {"a": a, "b": b}
    router.close()
    a.close()
    b.close()


def client(router, key: str = KEYS[0]) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key=key, max_retries=0, timeout=120)


def backend_of(raw) -> str:
    return raw.headers["x-serval-backend"]


def test_lookups_and_continuations_reach_the_backend_that_stores_the_response(cluster):
    router, backends = cluster
    alice = client(router)
    raw = alice.responses.with_raw_response.create(model="tiny", input="Hello there", max_output_tokens=4)
    first, home = raw.parse(), backend_of(raw)
    # the other backend really does not have it: only routing by id can find it
    other = backends["b" if home == "a" else "a"]
    assert httpx.get(f"{other.url}/v1/responses/{first.id}").status_code == 404
    for _ in range(3):  # round_robin alternates; a lookup does not
        raw_get = alice.responses.with_raw_response.retrieve(first.id)
        assert backend_of(raw_get) == home and raw_get.parse().id == first.id
    items = alice.responses.input_items.list(first.id)
    assert [item.content[0].text for item in items.data] == ["Hello there"]
    previous = first
    for turn in range(3):
        raw_next = alice.responses.with_raw_response.create(model="tiny", input=f"And then {turn}?",
                                                            previous_response_id=previous.id, max_output_tokens=4)
        assert backend_of(raw_next) == home
        previous = raw_next.parse()
        assert previous.previous_response_id is not None
    assert alice.responses.retrieve(previous.id).id == previous.id


def test_a_streamed_response_is_found_by_the_id_in_its_first_event(cluster):
    router, _ = cluster
    alice = client(router)
    with alice.responses.stream(model="tiny", input="Stream this", max_output_tokens=4) as stream:
        events = list(stream)
    final = events[-1].response  # response.incomplete: cut by max_output_tokens
    assert events[0].type == "response.created" and events[0].response.id == final.id
    homes = {backend_of(alice.responses.with_raw_response.retrieve(final.id)) for _ in range(3)}
    assert len(homes) == 1 and alice.responses.retrieve(final.id).output_text == final.output_text


def test_another_key_gets_404_and_deletion_is_forwarded(cluster):
    router, _ = cluster
    alice, bob = client(router), client(router, KEYS[1])
    response = alice.responses.create(model="tiny", input="Mine", max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError) as continuation:
        bob.responses.create(model="tiny", input="Yours?", previous_response_id=response.id, max_output_tokens=2)
    assert continuation.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        bob.responses.delete(response.id)
    alice.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(response.id)


def test_unknown_ids_and_missing_keys(cluster):
    router, _ = cluster
    unknown = httpx.get(f"{router.url}/v1/responses/resp-nope", headers={"Authorization": f"Bearer {KEYS[0]}"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "not_found" and "resp-nope" in unknown.json()["error"]["message"]
    assert httpx.get(f"{router.url}/v1/responses/resp-nope").status_code == 401
    assert httpx.post(f"{router.url}/v1/responses", json={"model": "tiny", "input": "x"}).status_code == 401
    assert httpx.get(f"{router.url}/health").status_code == 200
