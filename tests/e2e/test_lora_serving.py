"""LoRA adapters through a real `serval serve` and the official `openai` client: adapters from --lora-modules are
listed and picked by `model` (tokens equal PEFT's), loaded and unloaded at run time while requests stream (none
fails; requests running with an unloaded adapter finish), and bad adapters are answered with OpenAI's error body
while the server goes on serving."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import torch
import transformers

from tests.e2e.server import API_KEY, RemoteServer, tiny_model_dir
from tests.lora.peft_adapters import build_adapter, greedy

MODEL = "tiny"
PROMPT = [1, 520, 4000, 77, 1234, 9000, 15]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """name -> folder: three good adapters of the tiny model and the bad ones."""
    root = tmp_path_factory.mktemp("lora_e2e")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    folders, references = {}, {None: greedy(hf, PROMPT, MAX_TOKENS)}
    for seed, (name, rank) in enumerate([("alpha", 8), ("beta", 16), ("gamma", 4)], start=1):
        model = build_adapter(hf, root / name, rank=rank, alpha=2 * rank, seed=seed)
        folders[name], references[name] = str(root / name), greedy(model, PROMPT, MAX_TOKENS)
        assert references[name] != references[None]
    build_adapter(hf, root / "rank32", rank=32)
    build_adapter(hf, root / "lm_head", targets=["q_proj", "lm_head"])
    build_adapter(hf, root / "unknown", targets=["q_proj"])
    config_file = root / "unknown" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "target_modules": ["q_proj", "w_pack"]}))
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=hf.config.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2))
    build_adapter(other, root / "other_base", targets=["q_proj"])
    (root / "empty").mkdir()
    for name in ("rank32", "lm_head", "unknown", "other_base", "empty"):
        folders[name] = str(root / name)
    folders["missing"] = str(root / "nowhere")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir())
    texts = {name: tokenizer.decode(tokens) for name, tokens in references.items()}
    return folders, texts


@pytest.fixture(scope="module")
def server(adapters):
    folders, _ = adapters
    remote = RemoteServer(["--model", tiny_model_dir(), "--max-model-len", "256", "--served-model-name", MODEL,
                           "--enable-lora", "--max-loras", "2", "--max-lora-rank", "16", "--max-cpu-loras", "2",
                           "--lora-modules", f"alpha={folders['alpha']}",
                           json.dumps({"name": "beta", "path": folders["beta"], "base_model_name": MODEL}),
                           "--allow-runtime-lora-updating"], api_key=API_KEY)
    yield remote
    remote.close()


def post(server, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers={**server.headers, **(headers or {})}, timeout=120)


def complete(server, model: str) -> str:
    completion = server.client().completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                                    extra_body={"ignore_eos": True})
    return completion.choices[0].text


def assert_error(response: httpx.Response, status: int, param: str | None, match: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    assert match in error["message"], error


def test_adapters_are_listed_with_their_parent(server, adapters):
    cards = {card.id: card for card in server.client().models.list().data}
    assert set(cards) == {MODEL, "alpha", "beta"}
    assert cards["alpha"].model_extra["parent"] == MODEL and cards["beta"].model_extra["parent"] == MODEL
    assert cards["alpha"].model_extra["root"] == adapters[0]["alpha"]


def test_model_picks_the_adapter(server, adapters):
    _, texts = adapters
    assert complete(server, MODEL) == texts[None]
    assert complete(server, "alpha") == texts["alpha"]
    assert complete(server, "beta") == texts["beta"]
    chat = server.client().chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=3)
    assert chat.model == "beta"


def test_unknown_model_is_404(server):
    response = post(server, "/v1/completions", {"model": "delta", "prompt": PROMPT, "max_tokens": 1})
    assert_error(response, 404, "model", "LoRA adapters ['alpha', 'beta']")


def test_load_and_unload_under_concurrent_traffic(server, adapters):
    """Streams for the base and both adapters run while gamma is loaded and alpha unloaded: every request ends
    well, alpha's included (they were still streaming when it was unloaded: unloading lets them finish), each
    stream begins with PEFT's tokens, gamma serves PEFT's tokens, and alpha is then gone."""
    folders, texts = adapters
    client = server.async_client()
    models = [MODEL, "alpha", "beta"] * 3
    started = [asyncio.Event() for _ in models]
    unloaded_event = asyncio.Event()

    async def stream(model: str, max_tokens: int, first: asyncio.Event | None = None) -> tuple[str, str, int]:
        chunks = await client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        text, reason, after_unload = "", None, 0
        async for chunk in chunks:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
            after_unload += unloaded_event.is_set()
            if first is not None:
                first.set()
        return text, reason, after_unload

    async def scenario():
        traffic = [asyncio.create_task(stream(model, 240, event)) for model, event in zip(models, started)]
        await asyncio.gather(*(event.wait() for event in started))
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as http:
            loaded = await http.post("/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": folders["gamma"]})
            unloaded = await http.post("/v1/unload_lora_adapter", json={"lora_name": "alpha"})
            unloaded_event.set()
            # With --max-loras 2 gamma waits for alpha's or beta's requests to end before it runs.
            gamma = await stream("gamma", MAX_TOKENS)
        return loaded, gamma, unloaded, await asyncio.gather(*traffic)

    loaded, gamma, unloaded, results = asyncio.run(scenario())
    assert loaded.status_code == 200 and "gamma" in loaded.text
    assert unloaded.status_code == 200 and "alpha" in unloaded.text
    assert gamma[:2] == (texts["gamma"], "length")
    assert all(reason == "length" for _, reason, _ in results), results
    for (text, _, _), model in zip(results, models):
        assert text.startswith(texts[None if model == MODEL else model])
    assert any(after for (_, _, after), model in zip(results, models) if model == "alpha")
    assert {card.id for card in server.client().models.list().data} == {MODEL, "beta", "gamma"}
    response = post(server, "/v1/completions", {"model": "alpha", "prompt": PROMPT, "max_tokens": 1})
    assert_error(response, 404, "model", "does not exist")
    # Loaded again under its name: a new adapter (new id), serving the same tokens.
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "alpha", "lora_path": folders["alpha"]}).status_code == 200
    assert complete(server, "alpha") == texts["alpha"]


@pytest.mark.parametrize("name, match", [
    ("missing", "no such folder"), ("empty", "adapter_config.json is missing"),
    ("rank32", "over --max-lora-rank 16"), ("other_base", "trained on another model"),
    ("unknown", "unknown target module 'w_pack'"), ("lm_head", "embeddings or the LM head")])
def test_bad_adapters_are_400(server, adapters, name, match):
    folders, texts = adapters
    response = post(server, "/v1/load_lora_adapter", {"lora_name": f"bad-{name}", "lora_path": folders[name]})
    assert_error(response, 400, "lora_path", match)
    assert f"bad-{name}" not in {card.id for card in server.client().models.list().data}
    assert complete(server, "beta") == texts["beta"]  # still serving


def test_taken_names_and_unknown_unloads(server, adapters):
    folders, _ = adapters
    assert_error(post(server, "/v1/load_lora_adapter", {"lora_name": "beta", "lora_path": folders["gamma"]}),
                 400, "lora_name", "already taken")
    assert_error(post(server, "/v1/load_lora_adapter", {"lora_name": MODEL, "lora_path": folders["gamma"]}),
                 400, "lora_name", "already taken")
    assert_error(post(server, "/v1/unload_lora_adapter", {"lora_name": "nobody"}), 404, "lora_name", "not loaded")
    assert_error(post(server, "/v1/load_lora_adapter", {"lora_name": "x"}), 400, "lora_path", "")


def test_management_needs_the_key(server, adapters):
    folders, _ = adapters
    response = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "k", "lora_path": folders["gamma"]},
                          timeout=30)
    assert response.status_code == 401 and response.json()["error"]["message"]


def test_lora_requests_info_metric(server):
    samples = [labels for (name, labels) in server.metrics() if name == "serval:lora_requests_info"]
    assert samples and dict(samples[0])["max_lora"] == "2"


def test_runtime_updating_off_by_default(adapters):
    folders, texts = adapters
    remote = RemoteServer(["--model", tiny_model_dir(), "--max-model-len", "256", "--served-model-name", MODEL,
                           "--enable-lora", "--lora-modules", f"gamma={folders['gamma']}"])
    try:
        response = httpx.post(remote.url + "/v1/load_lora_adapter",
                              json={"lora_name": "x", "lora_path": folders["alpha"]}, timeout=30)
        assert_error(response, 404, None, "--allow-runtime-lora-updating")
        assert complete(remote, "gamma") == texts["gamma"]
    finally:
        remote.close()


def test_the_router_routes_by_adapter_name(server, adapters):
    """serval route already routes by adapter: an adapter is a model name, declared as its own group (so its
    cache_aware prefix trees are its own); the backend gets the adapter's name and answers with its tokens."""
    from tests.e2e.router_support import RouterProcess
    _, texts = adapters
    router = RouterProcess({
        "backends": [{"name": "lora", "url": server.url, "models": [MODEL, "beta"], "engine": "serval",
                      "api_key": API_KEY}],
        "models": [{"name": MODEL, "policy": "cache_aware"}, {"name": "beta", "policy": "cache_aware"}],
        "health_check": {"interval_s": 0.3, "timeout_s": 5}})
    try:
        client = httpx.Client(base_url=router.url, timeout=120)
        for _ in range(150):  # until its first health check has passed
            if router.metric("serval:router_backend_healthy", backend="lora") == 1:
                break
            time.sleep(0.2)
        for model in ("beta", MODEL):
            response = client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                                                            "temperature": 0, "ignore_eos": True})
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == texts["beta" if model == "beta" else None]
    finally:
        router.close()
