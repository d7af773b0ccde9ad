"""`serval serve --engine-process`: the engine's step loop in its own process (serval.engine.core_process), behind
the same server, checked with the official `openai` client and httpx against a real server.

Everything crosses the process boundary as it did in-process: streamed chat and tool calls (Qwen3's template, the
hermes parser, a grammar-enforced tool_choice), concurrent greedy streams equal to the in-process engine's tokens
(serval.LLM on the same weights), n > 1 with logprobs, a client that leaves frees its request, a LoRA adapter
loaded at run time serves PEFT's tokens, /metrics counters move. A core killed with SIGKILL turns /health to 503
and fails the streams in flight; SIGTERM, or the API process killed, leaves no engine process behind."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import httpx
import jsonschema
import pytest
import torch
import transformers

from tests.e2e.server import RemoteServer, tiny_model_dir
from tests.e2e.tiny_qwen3 import tiny_qwen3_dir

MODEL = "tiny-qwen3"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city"],
    "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1,
                                                                        "maximum": 7}}}}}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
PROMPTS = [[1, 520, 4000, 77, 1234, 9000, 15], [42, 7, 7, 7], [300, 301, 302, 303, 304], [11, 2000],
           [5000, 6000, 7000], [99, 98, 97, 96, 95, 94], [123], [4321, 1234, 4321]]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def server():
    remote = RemoteServer(["--model", tiny_qwen3_dir(), "--max-model-len", "1024", "--served-model-name", MODEL,
                           "--tool-call-parser", "hermes", "--enable-auto-tool-choice", "--engine-process",
                           "--enable-lora", "--max-lora-rank", "8", "--allow-runtime-lora-updating"])
    yield remote
    remote.close()


def core_pid(remote: RemoteServer) -> int:
    return remote.wait_for_log("engine core process started")["core_pid"]


def parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent to read its status."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_the_engine_runs_in_a_child_process(server):
    pid = core_pid(server)
    assert pid != server.process.pid and alive(pid)
    fork_server = parent_pid(pid)  # the core is forked by the server's fork server (serval.distributed.processes)
    with open(f"/proc/{fork_server}/cmdline") as f:
        assert "forkserver" in f.read()
    assert parent_pid(fork_server) == server.process.pid


def test_streamed_chat_and_tool_calls(server):
    client = server.client(timeout=300)
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=16)
    chunks = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=16,
                                            stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == \
        whole.choices[0].message.content

    forced = dict(model=MODEL, messages=MESSAGES, tools=[WEATHER], tool_choice="required", temperature=0,
                  max_tokens=64, parallel_tool_calls=False)
    whole = client.chat.completions.create(**forced)
    call = whole.choices[0].message.tool_calls[0]
    assert whole.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    names, arguments, reasons = [], "", []
    for chunk in client.chat.completions.create(**forced, stream=True):
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                if delta.function.name:
                    names.append(delta.function.name)
                arguments += delta.function.arguments or ""
            reasons.append(choice.finish_reason)
    assert names == ["get_weather"] and arguments == call.function.arguments
    assert reasons[-1] == "tool_calls"


@pytest.fixture(scope="module")
def in_process_texts():
    """The in-process engine's greedy texts for PROMPTS on the same weights."""
    from serval import LLM, SamplingParams
    llm = LLM(model=tiny_qwen3_dir(), max_model_len=1024)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": prompt} for prompt in PROMPTS], params, use_tqdm=False)
    llm.shutdown()
    return [output.outputs[0].text for output in outputs]


def test_concurrent_streams_match_the_in_process_engine(server, in_process_texts):
    client = server.async_client(timeout=300)

    async def stream(prompt):
        text, reason = "", None
        async for chunk in await client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS,
                                                           temperature=0, stream=True,
                                                           extra_body={"ignore_eos": True}):
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def run():
        return await asyncio.gather(*(stream(prompt) for prompt in PROMPTS))

    results = asyncio.run(run())
    assert [text for text, _ in results] == in_process_texts
    assert {reason for _, reason in results} == {"length"}


def test_n_samples_with_logprobs(server, in_process_texts):
    response = server.client(timeout=300).completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, n=3, logprobs=2,
        extra_body={"ignore_eos": True})
    assert sorted(choice.index for choice in response.choices) == [0, 1, 2]
    for choice in response.choices:
        assert choice.text == in_process_texts[0]
        assert len(choice.logprobs.tokens) == MAX_TOKENS
        assert all(len(top) >= 1 for top in choice.logprobs.top_logprobs)
    assert response.usage.completion_tokens == 3 * MAX_TOKENS


def test_client_disconnect_frees_the_request(server):
    assert server.wait_idle()
    with httpx.stream("POST", server.url + "/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": PROMPTS[1], "max_tokens": 900, "stream": True, "ignore_eos": True}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        assert server.metric("serval:num_requests_running") == 1
    assert server.wait_idle(), "the request kept running after its client left"


def test_a_cache_salt_crosses_to_the_core(server):
    """vLLM's cache_salt reaches the engine core's prefix cache: hits within a salt only (as in-process,
    tests/e2e/test_vllm_flags.py)."""
    ids = [(17 * i + 9) % 800 + 30 for i in range(48)]

    def cached_tokens(salt: str) -> int:
        answer = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": ids, "max_tokens": 1, "cache_salt": salt})
        return answer.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    first, again, other_salt = cached_tokens("a"), cached_tokens("a"), cached_tokens("b")
    assert first == 0 and again > 0 and other_salt == 0


def test_metrics_counters_move(server):
    before = server.metric("serval:generation_tokens_total")
    prompts_before = server.metric("serval:prompt_tokens_total")
    server.client(timeout=300).completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=MAX_TOKENS,
                                                  extra_body={"ignore_eos": True})
    assert server.wait_idle()
    assert server.metric("serval:generation_tokens_total") - before == MAX_TOKENS
    assert server.metric("serval:prompt_tokens_total") - prompts_before == len(PROMPTS[2])


def test_lora_adapter_loaded_at_run_time(server, tmp_path):
    from tests.lora.peft_adapters import build_adapter, greedy
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir(), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    adapted = build_adapter(hf, tmp_path / "delta", rank=8, alpha=16, seed=3)
    expected = greedy(adapted, PROMPTS[0], 6)
    assert expected != greedy(hf, PROMPTS[0], 6)
    loaded = httpx.post(server.url + "/v1/load_lora_adapter", timeout=120,
                        json={"lora_name": "delta", "lora_path": str(tmp_path / "delta")})
    assert loaded.status_code == 200, loaded.text
    response = server.client(timeout=300).completions.create(model="delta", prompt=PROMPTS[0], max_tokens=6,
                                                             temperature=0, extra_body={"ignore_eos": True})
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_qwen3_dir())
    assert response.choices[0].text == tokenizer.decode(expected)
    bad = httpx.post(server.url + "/v1/load_lora_adapter", timeout=120,
                     json={"lora_name": "nowhere", "lora_path": str(tmp_path / "nowhere")})
    assert bad.status_code == 400 and bad.json()["error"]["message"]


def small_server(*extra: str) -> RemoteServer:
    return RemoteServer(["--model", tiny_model_dir(), "--max-model-len", "256", "--served-model-name", "tiny",
                         "--engine-process", *extra])


def test_killed_core_turns_health_503_and_fails_streams():
    """SIGKILL the core mid-stream: the stream ends with OpenAI's error event, /health and new requests get 503,
    and the server exits non-zero (as for an engine loop that dies in-process) so a supervisor restarts it."""
    remote = small_server()
    try:
        pid = core_pid(remote)
        outcome = {}
        started = threading.Event()

        def stream():
            events = []
            with httpx.stream("POST", remote.url + "/v1/completions", timeout=120, json={
                    "model": "tiny", "prompt": [1, 2, 3], "max_tokens": 200, "stream": True,
                    "ignore_eos": True}) as response:
                for line in response.iter_lines():
                    events.append(line)
                    started.set()
            outcome["events"] = events

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60)
        os.kill(pid, signal.SIGKILL)
        health, refused = None, None
        deadline = time.monotonic() + 10
        while health != 503 and time.monotonic() < deadline:
            health = httpx.get(remote.url + "/health", timeout=5).status_code
            if health == 503:  # at once: the server exits shortly after (its engine watchdog)
                refused = httpx.post(remote.url + "/v1/completions", timeout=30,
                                     json={"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 2}).status_code
        assert health == 503 and refused == 503
        reader.join(60)
        assert not reader.is_alive()
        errors = [json.loads(line[6:])["error"] for line in outcome["events"]
                  if line.startswith("data: {") and '"error"' in line]
        assert errors and errors[0]["message"], outcome["events"][-3:]
        assert remote.process.wait(timeout=60) != 0
        assert any(str(record.get("message", "")).startswith("the engine core process has stopped")
                   for record in remote.log_records())
    finally:
        remote.close()


def test_sigterm_leaves_no_engine_process():
    remote = small_server()
    try:
        pid = core_pid(remote)
        assert remote.client().completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=2).choices
        remote.process.send_signal(signal.SIGTERM)
        remote.process.wait(timeout=60)
        assert wait_gone(pid, 30), "the engine process outlived the server"
    finally:
        remote.close()


def test_killed_api_process_takes_the_core_with_it(server):
    """The module's server, killed by the file's last test (no later test needs it): a start-up saved."""
    pid = core_pid(server)
    fork_server = parent_pid(pid)
    server.process.kill()
    server.process.wait(timeout=30)
    assert wait_gone(pid, 30), "the engine process outlived the killed server"
    assert wait_gone(fork_server, 30), "the fork server outlived the killed server and its engine process"
