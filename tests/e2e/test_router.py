"""The router in front of real `serval serve` processes: two replicas of one tiny model (a, b) and a different
model with a longer context (c). Model-name routing, merged /v1/models, each policy's choice, streaming relayed
intact, context-window fallback, load scraping, metrics."""
import asyncio
import json

import httpx
import pytest

from tests.e2e.router_support import RouterProcess, other_model_dir, start_servers
from tests.e2e.server import tiny_model_dir

POLICIES = ["round_robin", "least_requests", "cache_aware", "session", "cost", "latency"]


@pytest.fixture(scope="module")
def cluster():
    tiny = ["--model", tiny_model_dir(), "--max-model-len", "256", "--served-model-name", "tiny"]
    a, b, c = start_servers([tiny, tiny, ["--model", other_model_dir(), "--max-model-len", "1024",
                                          "--served-model-name", "tiny-long"]])
    # a and b are not scraped here so that the policies see only the router's own, exact in-flight counts;
    # c is, to check the scraped signals.
    config = {
        "backends": [
            {"name": "a", "url": a.url, "models": ["tiny"], "engine": "serval", "scrape_metrics": False,
             "price": {"input": 1.0, "output": 2.0}},
            {"name": "b", "url": b.url + "/v1", "models": ["tiny"], "engine": "serval", "scrape_metrics": False,
             "price": {"input": 0.5, "output": 1.0}},
            {"name": "c", "url": c.url, "models": ["tiny-long"], "engine": "serval",
             "price": {"input": 3.0, "output": 6.0}}],
        "models": [{"name": "tiny", "backends": ["a", "b"], "policy": "round_robin", "aliases": ["tiny-alias"]},
                   *({"name": f"tiny-{policy}", "backends": ["a", "b"], "policy": policy} for policy in POLICIES),
                   {"name": "tiny-cheapest-fitting", "backends": ["a", "b", "c"], "policy": "cost"},
                   {"name": "tiny-long", "policy": "least_requests"}],
        "fallbacks": {"context_window": {"tiny": "tiny-long"}},
        "health_check": {"interval_s": 0.5}}
    router = RouterProcess(config)
    yield router, {"a": a, "b": b, "c": c}
    router.close()
    for server in (a, b, c):
        server.close()


@pytest.fixture(scope="module")
def client(cluster):
    with httpx.Client(base_url=cluster[0].url, timeout=120) as client:
        yield client


def complete(client, model: str, prompt: str = "Hello there", **fields) -> httpx.Response:
    response = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 4, **fields})
    assert response.status_code == 200, response.text
    return response


def backend_of(response: httpx.Response) -> str:
    return response.headers["x-serval-backend"]


def events(raw: str) -> list[dict | str]:
    out = []
    for block in raw.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def comparable(raw: str) -> list:
    """The events without what differs between two runs: ids, timestamps, prefix-cache hits."""
    out = []
    for event in events(raw):
        if isinstance(event, dict):
            event = {k: v for k, v in event.items() if k not in ("id", "created")}
            if event.get("usage"):
                event["usage"].pop("prompt_tokens_details", None)
        out.append(event)
    return out


def test_models_are_merged_with_their_context_lengths(client):
    cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    assert {"tiny", "tiny-alias", "tiny-long", *(f"tiny-{p}" for p in POLICIES)} <= set(cards)
    assert cards["tiny"]["max_model_len"] == 256 and cards["tiny-long"]["max_model_len"] == 1024
    assert cards["tiny-alias"]["root"] == "tiny" and cards["tiny"]["backends"] == ["a", "b"]


def test_model_name_routing(client):
    assert backend_of(complete(client, "tiny-long")) == "c"
    for model in ("tiny", "tiny-alias"):
        response = complete(client, model)
        assert backend_of(response) in ("a", "b") and response.json()["model"] == "tiny"
    missing = client.post("/v1/completions", json={"model": "gpt-5", "prompt": "p"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_streaming_is_relayed_intact(cluster, client):
    _, servers = cluster
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 12,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    direct = httpx.post(servers["a"].url + "/v1/chat/completions", json=body, timeout=60).text
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        routed = response.read().decode()
    assert comparable(routed) == comparable(direct)
    assert routed.endswith("data: [DONE]\n\n") and events(routed)[-2]["usage"]["completion_tokens"] == 12


def test_the_openai_client_works_through_the_router(cluster):
    import openai
    client = openai.OpenAI(base_url=cluster[0].url + "/v1", api_key="none", max_retries=0)
    reply = client.chat.completions.create(model="tiny-long", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=5)
    assert reply.choices[0].finish_reason in ("length", "stop")
    chunks = list(client.completions.create(model="tiny", prompt="Once", max_tokens=5, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_round_robin_alternates(client):
    chosen = [backend_of(complete(client, "tiny-round_robin")) for _ in range(4)]
    assert chosen in (["a", "b", "a", "b"], ["b", "a", "b", "a"])


def test_least_requests_spreads_concurrent_requests(cluster, client):
    # Avoiding a busy backend is shown with a held stream in tests/router/test_gateway.py: a real engine
    # finishes too fast to hold one open here.
    router, _ = cluster

    async def burst():
        async with httpx.AsyncClient(base_url=router.url, timeout=120) as session:
            return await asyncio.gather(*(session.post("/v1/completions", json={
                "model": "tiny-least_requests", "prompt": f"story {i}", "max_tokens": 30, "ignore_eos": True})
                for i in range(6)))

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    assert {backend_of(r) for r in responses} == {"a", "b"}
    assert router.metric("serval:router_decisions_total", model="tiny-least_requests", reason="least_load") == 6


def test_cache_aware_keeps_each_shared_prefix_on_one_backend(cluster, client):
    router, servers = cluster
    hits_before = {name: servers[name].metric("serval:prefix_cache_hits_total") for name in ("a", "b")}
    pirate = "You are a pirate who answers every question in rhymes about the sea. " * 3
    lawyer = "You are a careful lawyer who cites the statute for every claim you make. " * 3
    homes = {}
    for question in ("Where is the treasure?", "What is the weather?", "Who are you?"):
        for family, system in (("pirate", pirate), ("lawyer", lawyer)):
            backend = backend_of(complete(client, "tiny-cache_aware", system + question))
            assert homes.setdefault(family, backend) == backend
    assert homes["pirate"] != homes["lawyer"]  # new prefixes spread over the replicas
    assert router.metric("serval:router_decisions_total", model="tiny-cache_aware", reason="cache_hit") >= 4
    for name in ("a", "b"):  # the backends' prefix caches did hit
        assert servers[name].metric("serval:prefix_cache_hits_total") > hits_before[name]


def test_session_sticks_by_header_and_by_user(client):
    for headers, fields in (({"x-session-id": "conversation-7"}, {}), ({}, {"user": "alice"})):
        chosen = {backend_of(client.post("/v1/completions", headers=headers, json={
            "model": "tiny-session", "prompt": f"turn {turn}", "max_tokens": 2, **fields})) for turn in range(4)}
        assert len(chosen) == 1
    spread = {backend_of(complete(client, "tiny-session", user=f"user-{i}")) for i in range(12)}
    assert spread == {"a", "b"}


def test_cost_picks_the_cheapest_backend_that_fits(client):
    assert {backend_of(complete(client, "tiny-cost")) for _ in range(3)} == {"b"}
    long_prompt = "word " * 300  # ~375 estimated tokens: only c's 1024-token context fits
    assert backend_of(complete(client, "tiny-cheapest-fitting", "short")) == "b"
    assert backend_of(complete(client, "tiny-cheapest-fitting", long_prompt)) == "c"


def test_latency_prefers_the_lower_ttft_average(cluster, client):
    router, _ = cluster
    for _ in range(2):  # stream once through each, so both have a measured TTFT
        with client.stream("POST", "/v1/completions", json={"model": "tiny-latency", "prompt": "p",
                                                             "max_tokens": 2, "stream": True}) as response:
            response.read()
    ttft = {name: router.metric("serval:router_backend_ttft_ewma_seconds", backend=name) for name in ("a", "b")}
    assert all(value > 0 for value in ttft.values())
    # a non-streaming request adds no TTFT sample, so the averages it was chosen on are the ones read above
    assert backend_of(complete(client, "tiny-latency")) == min(ttft, key=ttft.get)


def test_context_window_fallback_by_estimate_and_by_backend_rejection(cluster, client):
    router, _ = cluster
    before = router.metric("serval:router_fallbacks_total", model="tiny", fallback="tiny-long")
    estimated_long = "word " * 300  # estimated over 256 tokens: goes straight to the fallback
    assert backend_of(complete(client, "tiny", estimated_long)) == "c"
    looks_short = "1 " * 300  # 600 tokens, estimated at 150: the replica rejects it, then the fallback serves
    response = complete(client, "tiny", looks_short)
    assert backend_of(response) == "c" and response.json()["usage"]["prompt_tokens"] >= 600
    assert router.metric("serval:router_fallbacks_total", model="tiny", fallback="tiny-long") == before + 2
    assert router.metric("serval:router_requests_total", model="tiny", outcome="context_length_exceeded") >= 1
    # without a fallback the backend's own 400 reaches the client
    rejected = client.post("/v1/completions", json={"model": "tiny-round_robin", "prompt": looks_short})
    assert rejected.status_code == 400 and rejected.json()["error"]["code"] == "context_length_exceeded"


def test_metrics_and_scraped_load_signals(cluster, client):
    router, _ = cluster
    complete(client, "tiny-long")
    assert router.metric("serval:router_requests_total", backend="c", model="tiny-long", outcome="success") >= 1
    assert router.metric("serval:router_decisions_total", model="tiny-round_robin", policy="round_robin") >= 4
    assert router.metric("serval:router_request_duration_seconds_count", model="tiny-long") >= 1
    text = httpx.get(router.url + "/metrics").text
    assert 'serval:router_backend_kv_cache_usage_perc{backend="c"}' in text  # scraped from c's /metrics
    assert 'serval:router_backend_waiting_requests{backend="a"}' not in text  # a is not scraped
    assert 'serval:router_breaker_state{backend="a"} 0.0' in text
    health = httpx.get(router.url + "/health").json()
    assert health["status"] == "ok" and set(health["backends"]) == {"a", "b", "c"}


BAD_REQUESTS = [
    {"prompt": "p", "max_tokens": -1},
    {"prompt": "p", "temperature": -3},
    {"prompt": "p", "logit_bias": {"not-a-token": 1}},
    {"prompt": [10 ** 9]},  # a token id past the vocabulary
    {"prompt": "p", "stop_token_ids": [10 ** 9], "min_tokens": 1},  # once stopped the engine (defect 1)
    {"prompt": "p", "n": 0},
    {"prompt": "p", "structured_outputs": {"regex": "("}},
]


def test_bad_requests_are_answered_by_one_backend_and_open_no_breaker(cluster, client):
    """Issue 13, defect 3: requests the backends refuse must not be retried across them nor counted as their
    failures, or a few of them would open every breaker and take the fleet down for everyone."""
    router, _ = cluster
    retries = router.metric("serval:router_retries_total", model="tiny")
    failures = sum(router.metric("serval:router_requests_total", backend=name, outcome="backend_error")
                   for name in ("a", "b"))
    for body in BAD_REQUESTS * 2:  # 16 bad requests against breakers that open after 3 failures
        response = client.post("/v1/completions", json={"model": "tiny", **body})
        assert 400 <= response.status_code < 500, (body, response.text)
        error = response.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error"
    assert router.metric("serval:router_retries_total", model="tiny") == retries
    assert sum(router.metric("serval:router_requests_total", backend=name, outcome="backend_error")
               for name in ("a", "b")) == failures
    assert all(router.metric("serval:router_breaker_state", backend=name) == 0 for name in ("a", "b", "c"))
    assert {backend_of(complete(client, "tiny")) for _ in range(2)} == {"a", "b"}  # both still serve


def test_a_backend_killed_mid_run_loses_no_request_that_had_not_started_streaming(cluster):
    """Last in the module: it kills replica b."""
    router, servers = cluster
    body = {"model": "tiny", "prompt": "A long tale", "max_tokens": 40, "ignore_eos": True}

    async def stream(session, index):
        async with session.stream("POST", "/v1/completions", json={**body, "prompt": f"tale {index}",
                                                                     "stream": True}) as response:
            return response.status_code, (await response.aread()).decode()

    async def run():
        async with httpx.AsyncClient(base_url=router.url, timeout=120) as session:
            whole = [asyncio.ensure_future(session.post("/v1/completions", json={**body, "prompt": f"tale {i}"}))
                     for i in range(16)]
            streams = [asyncio.ensure_future(stream(session, i)) for i in range(8)]
            for _ in range(400):  # kill b as soon as it is generating for some of them
                if await asyncio.to_thread(servers["b"].metric, "serval:num_requests_running") > 0:
                    break
                await asyncio.sleep(0.01)
            servers["b"].process.kill()
            later = [await session.post("/v1/completions", json={**body, "max_tokens": 5}) for _ in range(4)]
            return await asyncio.gather(*whole), await asyncio.gather(*streams), later

    whole, streams, later = asyncio.run(run())
    for response in whole + later:
        assert response.status_code == 200, response.text
    assert [r.json()["usage"]["completion_tokens"] for r in whole] == [40] * 16
    for status, raw in streams:
        assert status == 200
        parsed = events(raw)
        errors = [i for i, event in enumerate(parsed) if isinstance(event, dict) and "error" in event]
        # a stream may fail only if it had started: content reached the client before the error
        assert not errors or any(isinstance(e, dict) and e.get("choices") for e in parsed[:errors[0]])
        assert parsed[-1] == "[DONE]"
    assert all(backend_of(response) == "a" for response in later)
    assert router.metric("serval:router_requests_total", backend="b", outcome="backend_error") >= 1
