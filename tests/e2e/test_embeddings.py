"""/v1/embeddings, /v1/score and /v1/rerank through a real `serval serve --runner pooling`, against transformers on
the same tiny random weights, with the official `openai` client where it has the endpoint (embeddings) and httpx
where it does not (score, rerank: vLLM's shapes)."""
from __future__ import annotations

import asyncio
import base64
import functools
import json

import httpx
import numpy as np
import openai
import pytest
import torch
import transformers

from tests.e2e.server import RemoteServer, tiny_model_dir
from tests.openai.tool_parsers.streaming import qwen3_tokenizer

MAX_MODEL_LEN = 64
TEXTS = ["The quick brown fox jumps over the lazy dog, again and again, until the dog finally gets up and leaves.",
         "Paged attention stores the KV cache in fixed-size blocks.",
         "hi"]
QUERY = "Which animal jumps?"
DOCUMENTS = ["A fox jumps over a dog.", "Block tables map positions to KV-cache blocks.", "Cats sleep all day long.",
             "Kangaroos jump far."]
INSTRUCTION = "Instruct: Given a question, retrieve passages that answer it\nQuery:"
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=256, initializer_range=0.08)


@functools.cache
def _tiny(kind: str, tmp_root: str):
    """A tiny random Qwen3 embedder (Qwen3Model) or one-label scorer (Qwen3ForSequenceClassification), saved with
    Qwen3's tokenizer; returns (directory, the transformers model)."""
    tokenizer = qwen3_tokenizer()
    path = f"{tmp_root}/{kind}"
    tokenizer.save_pretrained(path)
    config = transformers.Qwen3Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_labels=1,
                                      **SMALL)
    torch.manual_seed(1)
    model = (transformers.Qwen3Model(config) if kind == "embed"
             else transformers.Qwen3ForSequenceClassification(config)).eval()
    model.save_pretrained(path)
    if kind == "embed":  # Qwen3-Embedding's named prompts; none is applied unless asked for
        with open(f"{path}/config_sentence_transformers.json", "w") as f:
            json.dump({"prompts": {"query": INSTRUCTION, "document": ""}, "default_prompt_name": None}, f)
    return path, model


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    return _tiny("embed", str(tmp_path_factory.mktemp("pooling")))


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    return _tiny("score", str(tmp_path_factory.mktemp("pooling")))


def _serve(path: str, *extra: str) -> RemoteServer:
    # A step budget below the prompts' lengths: the long ones are prefilled in chunks, batched with the short.
    return RemoteServer([path, "--runner", "pooling", "--max-model-len", str(MAX_MODEL_LEN),
                         "--max-num-batched-tokens", "16", "--long-prefill-token-threshold", "0", *extra])


@pytest.fixture(scope="module")
def embed_server(embedder):
    server = _serve(embedder[0])
    yield server
    server.close()


@pytest.fixture(scope="module")
def score_server(scorer):
    server = _serve(scorer[0])
    yield server
    server.close()


def _reference_embedding(model, token_ids: list[int], dimensions: int | None = None) -> np.ndarray:
    with torch.no_grad():
        last = model(torch.tensor([token_ids])).last_hidden_state[0, -1]
    if dimensions is not None:
        last = last[:dimensions]
    return torch.nn.functional.normalize(last, dim=-1).numpy()


def _reference_logit(model, first: str, second: str) -> float:
    token_ids = qwen3_tokenizer()(text=first, text_pair=second)["input_ids"]
    with torch.no_grad():
        return float(model(torch.tensor([token_ids])).logits[0, 0])


def test_embeddings_equal_transformers_for_strings_and_token_arrays(embed_server, embedder):
    _, model = embedder
    tokenizer = qwen3_tokenizer()
    client = embed_server.client()
    response = client.embeddings.create(model=embed_server_model(embed_server), input=TEXTS)
    token_ids = [tokenizer.encode(text) for text in TEXTS]
    assert any(len(ids) > 16 for ids in token_ids)  # at least one prompt is prefilled in chunks
    assert [item.index for item in response.data] == [0, 1, 2]
    for item, ids in zip(response.data, token_ids):
        np.testing.assert_allclose(item.embedding, _reference_embedding(model, ids), atol=1e-4)
    assert response.usage.prompt_tokens == response.usage.total_tokens == sum(len(ids) for ids in token_ids)

    single = client.embeddings.create(model=embed_server_model(embed_server), input=token_ids[1])
    np.testing.assert_allclose(single.data[0].embedding, _reference_embedding(model, token_ids[1]), atol=1e-4)
    several = client.embeddings.create(model=embed_server_model(embed_server), input=token_ids[:2])
    for item, ids in zip(several.data, token_ids[:2]):
        np.testing.assert_allclose(item.embedding, _reference_embedding(model, ids), atol=1e-4)


def test_base64_and_matryoshka_dimensions(embed_server, embedder):
    _, model = embedder
    ids = qwen3_tokenizer().encode(TEXTS[0])
    client = embed_server.client()
    response = client.embeddings.create(model=embed_server_model(embed_server), input=TEXTS[0],
                                        encoding_format="base64", dimensions=16)
    vector = np.frombuffer(base64.b64decode(response.data[0].embedding), dtype="<f4")
    assert vector.shape == (16,)
    np.testing.assert_allclose(vector, _reference_embedding(model, ids, dimensions=16), atol=1e-4)
    assert abs(np.linalg.norm(vector) - 1.0) < 1e-5  # renormalised after truncation
    floats = client.embeddings.create(model=embed_server_model(embed_server), input=TEXTS[0], dimensions=16)
    np.testing.assert_allclose(floats.data[0].embedding, vector, atol=1e-6)


def test_prompt_name_puts_the_configs_instruction_before_the_text(embed_server, embedder):
    _, model = embedder
    client = embed_server.client()
    response = client.embeddings.create(model=embed_server_model(embed_server), input=QUERY,
                                        extra_body={"prompt_name": "query"})
    expected = _reference_embedding(model, qwen3_tokenizer().encode(INSTRUCTION + QUERY))
    np.testing.assert_allclose(response.data[0].embedding, expected, atol=1e-4)
    # Token arrays are the model's input as they are: no instruction is put before them.
    tokens = client.embeddings.create(model=embed_server_model(embed_server), input=[5, 6, 7],
                                      extra_body={"prompt_name": "query"})
    np.testing.assert_allclose(tokens.data[0].embedding, _reference_embedding(model, [5, 6, 7]), atol=1e-4)
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=embed_server_model(embed_server), input=QUERY,
                                 extra_body={"prompt_name": "passage"})
    assert caught.value.body["param"] == "prompt_name" and "query" in caught.value.message


def embed_server_model(server: RemoteServer) -> str:
    return server.client().models.list().data[0].id


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": [[1, 2], []]}, "input"),
    ({"input": list(range(1, MAX_MODEL_LEN + 2))}, "input"),  # too many tokens
    ({"input": [10 ** 9]}, "input"),  # not a token id
    ({"input": "x", "dimensions": 0}, "dimensions"),
    ({"input": "x", "dimensions": 65}, "dimensions"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
])
def test_bad_embedding_input_is_a_400_and_the_server_stays_up(embed_server, body, param):
    response = httpx.post(embed_server.url + "/v1/embeddings", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert httpx.get(embed_server.url + "/health", timeout=10).status_code == 200


def test_an_embedding_model_asked_for_chat_names_its_runner(embed_server):
    client = embed_server.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=embed_server_model(embed_server), prompt="hello", max_tokens=2)
    assert "pooling runner" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=embed_server_model(embed_server), max_tokens=2,
                                       messages=[{"role": "user", "content": "hello"}])
    assert "pooling runner" in caught.value.message
    assert httpx.get(embed_server.url + "/health", timeout=10).status_code == 200


def test_a_chat_model_asked_for_embeddings_names_its_runner():
    server = RemoteServer([tiny_model_dir(), "--max-model-len", "128"])
    try:
        client = server.client()
        for call in (lambda: client.embeddings.create(model=embed_server_model(server), input="hello"),
                     lambda: client.post("/score", body={"text_1": "a", "text_2": "b"}, cast_to=object),
                     lambda: client.post("/rerank", body={"query": "a", "documents": ["b"]}, cast_to=object)):
            with pytest.raises(openai.BadRequestError) as caught:
                call()
            assert "generate runner" in caught.value.message and "--runner pooling" in caught.value.message
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    finally:
        server.close()


def test_an_embedder_scores_by_cosine_similarity(embed_server, embedder):
    _, model = embedder
    tokenizer = qwen3_tokenizer()
    response = httpx.post(embed_server.url + "/v1/score", json={"text_1": QUERY, "text_2": DOCUMENTS[:2]},
                          timeout=60).json()
    query = _reference_embedding(model, tokenizer.encode(QUERY))
    for item, document in zip(response["data"], DOCUMENTS[:2]):
        expected = float(np.dot(query, _reference_embedding(model, tokenizer.encode(document))))
        assert item["score"] == pytest.approx(expected, abs=1e-4)


def test_score_equals_sequence_classification_logits(score_server, scorer):
    _, model = scorer
    url = score_server.url
    raw = httpx.post(url + "/v1/score", json={"text_1": QUERY, "text_2": DOCUMENTS, "activation": False},
                     timeout=60).json()
    logits = [_reference_logit(model, QUERY, document) for document in DOCUMENTS]
    assert raw["object"] == "list" and [item["index"] for item in raw["data"]] == list(range(len(DOCUMENTS)))
    np.testing.assert_allclose([item["score"] for item in raw["data"]], logits, atol=1e-4)
    # By default a one-label classifier's score is its sigmoid, as in vLLM; pairs of equal lists score pairwise.
    default = httpx.post(url + "/v1/score", json={"text_1": [QUERY, DOCUMENTS[0]], "text_2": DOCUMENTS[:2]},
                         timeout=60).json()
    expected = [_reference_logit(model, QUERY, DOCUMENTS[0]), _reference_logit(model, DOCUMENTS[0], DOCUMENTS[1])]
    np.testing.assert_allclose([item["score"] for item in default["data"]],
                               torch.tensor(expected).sigmoid().tolist(), atol=1e-5)
    assert default["usage"]["prompt_tokens"] > 0


def test_rerank_orders_documents_by_score(score_server, scorer):
    _, model = scorer
    scores = torch.tensor([_reference_logit(model, QUERY, document) for document in DOCUMENTS]).sigmoid().tolist()
    order = sorted(range(len(DOCUMENTS)), key=lambda index: -scores[index])
    response = httpx.post(score_server.url + "/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS, "top_n": 2},
                          timeout=60).json()
    assert [result["index"] for result in response["results"]] == order[:2]
    for result in response["results"]:
        assert result["relevance_score"] == pytest.approx(scores[result["index"]], abs=1e-5)
        assert result["document"] == {"text": DOCUMENTS[result["index"]]}
    bare = httpx.post(score_server.url + "/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS,
                                                           "return_documents": False}, timeout=60).json()
    assert [result["index"] for result in bare["results"]] == order
    assert all("document" not in result for result in bare["results"])
    assert bare["usage"]["total_tokens"] > 0


def test_a_classifier_refuses_embeddings_and_bad_rerank_input(score_server):
    url = score_server.url
    response = httpx.post(url + "/v1/embeddings", json={"input": "hello"}, timeout=60)
    assert response.status_code == 400 and "classifier" in response.json()["error"]["message"]
    for body, param in (({"query": "q", "documents": []}, "documents"), ({"query": "", "documents": ["d"]}, "query"),
                        ({"query": "q", "documents": ["d"], "top_n": -1}, "top_n")):
        response = httpx.post(url + "/v1/rerank", json=body, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    response = httpx.post(url + "/v1/score", json={"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "text_2"
    assert httpx.get(url + "/health", timeout=10).status_code == 200


def test_metrics_count_prompt_tokens_and_requests_by_endpoint(embed_server):
    before = embed_server.metric("serval:prompt_tokens_total")
    requests_before = embed_server.metric("serval:http_requests_total", handler="/v1/embeddings", status="200")
    response = embed_server.client().embeddings.create(model=embed_server_model(embed_server), input=["a b c", "d e"])
    assert embed_server.metric("serval:prompt_tokens_total") - before == response.usage.prompt_tokens
    assert embed_server.metric("serval:http_requests_total", handler="/v1/embeddings",
                               status="200") == requests_before + 1
    assert embed_server.metric("serval:request_prompt_tokens_count") >= 2
    assert embed_server.wait_idle()


def test_openapi_documents_the_pooling_bodies(embed_server):
    document = httpx.get(embed_server.url + "/openapi.json", timeout=30).json()
    schemas = document["components"]["schemas"]
    for path, model, field in [("/v1/embeddings", "EmbeddingRequest", "input"),
                               ("/v1/score", "ScoreRequest", "text_2"), ("/v1/rerank", "RerankRequest", "documents")]:
        body = document["paths"][path]["post"]["requestBody"]
        assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
        assert field in schemas[model]["properties"]
    refs = set(_refs(document))
    assert all(ref.rsplit("/", 1)[1] in schemas for ref in refs), refs  # no dangling reference


def _refs(value):
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "$ref":
                yield item
            else:
                yield from _refs(item)
    elif isinstance(value, list):
        for item in value:
            yield from _refs(item)


# ---------------------------------------------------------------- the guard's token budget on /v1/embeddings
BUDGET_KEYS = {name: f"sk-serval-embed-{name}" for name in ("budget", "burst", "other")}


@pytest.fixture(scope="module")
def guarded_embed_server(embedder, tmp_path_factory):
    """The embedder behind a policy: a key with a 40-token budget, one with 200 for a concurrent burst, and one
    without limits."""
    from serval.guard.keys import hash_key
    policy = tmp_path_factory.mktemp("embed-policy") / "policy.yaml"
    policy.write_text("keys:\n"
                      f"  - {{id: budget, sha256: {hash_key(BUDGET_KEYS['budget'])}, token_budget: 40}}\n"
                      f"  - {{id: burst, sha256: {hash_key(BUDGET_KEYS['burst'])}, token_budget: 200}}\n"
                      f"  - {{id: other, sha256: {hash_key(BUDGET_KEYS['other'])}}}\n")
    server = _serve(embedder[0], "--policy", str(policy))
    yield server
    server.close()


def _embed(server: RemoteServer, token_ids: list[int], key: str) -> httpx.Response:
    # Token arrays: the model's input as they are, so a request's token count is exact.
    return httpx.post(server.url + "/v1/embeddings", json={"input": token_ids}, timeout=60,
                      headers={"Authorization": f"Bearer {BUDGET_KEYS[key]}"})


def _assert_out_of_budget(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "insufficient_quota" and "budget" in error["message"]
    assert "Retry-After" not in response.headers  # a budget doesn't refill


def test_token_budget_refuses_embeddings_once_spent_and_other_keys_are_served(guarded_embed_server, embedder):
    server, (_, model) = guarded_embed_server, embedder
    first = _embed(server, [7] * 20, "budget")
    assert first.status_code == 200 and first.json()["usage"]["prompt_tokens"] == 20, first.text
    # 25 tokens don't fit the 20 left: refused whole, and not charged.
    _assert_out_of_budget(_embed(server, [7] * 25, "budget"))
    assert _embed(server, [8] * 20, "budget").status_code == 200  # exactly the rest
    _assert_out_of_budget(_embed(server, [9], "budget"))
    other = openai.OpenAI(base_url=server.url + "/v1", api_key=BUDGET_KEYS["other"], max_retries=0)
    model_name = other.models.list().data[0].id
    with pytest.raises(openai.RateLimitError) as caught:
        openai.OpenAI(base_url=server.url + "/v1", api_key=BUDGET_KEYS["budget"], max_retries=0).embeddings.create(
            model=model_name, input="one more")
    assert caught.value.code == "insufficient_quota"
    assert server.metric("serval:guard_key_tokens_total", key_id="budget") == 40
    # Another key is served as before, the right embeddings included.
    response = other.embeddings.create(model=model_name, input=[[7] * 20, [8] * 30])
    for item, ids in zip(response.data, ([7] * 20, [8] * 30)):
        np.testing.assert_allclose(item.embedding, _reference_embedding(model, ids), atol=1e-4)
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_concurrent_embeddings_cannot_overshoot_a_budget(guarded_embed_server):
    server = guarded_embed_server

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(
                server.url + "/v1/embeddings", headers={"Authorization": f"Bearer {BUDGET_KEYS['burst']}"},
                json={"input": [[11] * 10, [12] * 15]}) for _ in range(12)))

    responses = asyncio.run(burst())
    served = [response.json()["usage"]["total_tokens"] for response in responses if response.status_code == 200]
    refused = [response for response in responses if response.status_code != 200]
    assert served and refused and sum(served) <= 200, (served, [r.text for r in refused])
    for response in refused:  # out of budget, or the rest held by requests still running
        assert response.status_code == 429 and response.json()["error"]["code"] in ("insufficient_quota",
                                                                                      "rate_limit_exceeded")
    assert server.metric("serval:guard_key_tokens_total", key_id="burst") == sum(served)
    assert _embed(server, [5, 6, 7], "other").status_code == 200

