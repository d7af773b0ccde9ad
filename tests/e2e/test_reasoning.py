"""Reasoning through a real `serval serve --reasoning-parser qwen3 --tool-call-parser hermes` (no
--enable-auto-tool-choice) serving a tiny random-weight Qwen3 with Qwen3's real tokenizer and chat template.

A json_schema response_format with thinking on is "free thought, `</think>`, then the schema": the think section
goes to `reasoning_content`, the JSON to `content`, where it parses and validates (JSON never lands in the
reasoning). `enable_thinking: false` reaches the template and the parser: no reasoning. A model cut off mid-thought
gives all its text as reasoning. Tool grammars also wait for the end of the thought. The guard's output rails
filter the reasoning as well as the answer."""
import json
import os
import tempfile

import httpx
import jsonschema
import pytest

from tests.e2e.server import RemoteServer
from tests.e2e.test_tools import TOOLS, SCHEMAS, assert_valid_calls, stream_choice
from tests.e2e.tiny_qwen3 import tiny_qwen3_dir
from tests.openai.tool_parsers.streaming import qwen3_tokenizer

MODEL = "tiny-qwen3"
ANSWER = {"type": "object", "additionalProperties": False, "required": ["verdict", "score"],
          "properties": {"verdict": {"type": "string", "enum": ["yes", "no"]},
                         "score": {"type": "integer", "minimum": 0, "maximum": 9}}}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}
MESSAGES = [{"role": "user", "content": "Is it going to rain? Think first."}]
# The output rails redact this word wherever it appears, the think section included.
POLICY = 'output:\n  deny: [{name: codename, pattern: "osprey", action: redact}]\naudit: {path: audit.jsonl}\n'
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


def think_end_bias(bias: float = 10.0) -> dict:
    """A random-weight model would think for ever: this makes `</think>` likely within a few tokens."""
    return {str(qwen3_tokenizer().convert_tokens_to_ids("</think>")): bias}


@pytest.fixture(scope="module")
def server():
    with tempfile.TemporaryDirectory(prefix="serval-reasoning-") as directory:
        policy = os.path.join(directory, "policy.yaml")
        with open(policy, "w") as file:
            file.write(POLICY)
        remote = RemoteServer(["--model", tiny_qwen3_dir(), "--max-model-len", "1024", "--served-model-name", MODEL,
                               "--reasoning-parser", "qwen3", "--tool-call-parser", "hermes", "--policy", policy])
        remote.audit_path = os.path.join(directory, "audit.jsonl")
        yield remote
        remote.close()


@pytest.fixture(scope="module")
def client(server):
    return server.client(timeout=300)


def test_thought_then_valid_json(client):
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, response_format=RESPONSE_FORMAT, temperature=1.0, seed=7, n=4,
        max_tokens=120, logit_bias=think_end_bias())
    reasoning = []
    for choice in response.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), ANSWER)
        assert not choice.message.tool_calls
        text = choice.message.reasoning_content or ""
        assert '"verdict"' not in text and "</think>" not in text and "<think>" not in text
        reasoning.append(text)
    assert any(reasoning)


def test_streamed_reasoning_equals_whole(client):
    body = dict(model=MODEL, messages=MESSAGES, response_format=RESPONSE_FORMAT, temperature=1.0, seed=11,
                max_tokens=120, logit_bias=think_end_bias())
    (whole,) = client.chat.completions.create(**body).choices
    reasoning, content, finish_reason = [], [], None
    for chunk in client.chat.completions.create(stream=True, **body):
        delta = chunk.choices[0].delta
        reasoning.append(getattr(delta, "reasoning_content", None) or "")
        content.append(delta.content or "")
        finish_reason = chunk.choices[0].finish_reason or finish_reason
    assert "".join(reasoning) == (whole.message.reasoning_content or "")
    assert "".join(content) == whole.message.content
    assert finish_reason == whole.finish_reason == "stop"
    jsonschema.validate(json.loads(whole.message.content), ANSWER)


def test_enable_thinking_false_gives_no_reasoning(client):
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, response_format=RESPONSE_FORMAT, temperature=1.0, seed=7, n=4,
        max_tokens=60, extra_body=NO_THINKING)
    for choice in response.choices:
        assert choice.message.reasoning_content is None
        jsonschema.validate(json.loads(choice.message.content), ANSWER)
    prompt_tokens = response.usage.prompt_tokens
    text = qwen3_tokenizer().apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True,
                                                 enable_thinking=False)
    assert text.endswith("<think>\n\n</think>\n\n")  # the template really took the kwarg
    assert prompt_tokens == len(qwen3_tokenizer().encode(text, add_special_tokens=False))


def test_cut_off_mid_thought_is_all_reasoning(client):
    body = dict(model=MODEL, messages=MESSAGES, temperature=0.0, max_tokens=8)
    (whole,) = client.chat.completions.create(**body).choices
    assert whole.finish_reason == "length"
    assert whole.message.content is None and whole.message.reasoning_content
    streamed = stream_choice(client, **body)
    assert streamed["content"] is None and streamed["finish_reason"] == "length"


def test_required_tool_call_after_the_thought(client):
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        temperature=1.0, seed=5, n=8, max_tokens=120, logit_bias=think_end_bias())
    reasoning = []
    for choice in response.choices:
        (call,) = assert_valid_calls(choice, set(SCHEMAS))
        assert "<tool_call>" not in (choice.message.reasoning_content or "")
        reasoning.append(choice.message.reasoning_content)
    assert any(reasoning)


def test_auto_needs_the_flag(server, client):
    response = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": MESSAGES, "tools": TOOLS, "tool_choice": "auto", "max_tokens": 4})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "tool_choice" and "--enable-auto-tool-choice" in error["message"]
    # tools given and tool_choice left out means "auto" too (OpenAI's default)
    response = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": MESSAGES, "tools": TOOLS, "max_tokens": 4})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice"
    (choice,) = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                               extra_body=NO_THINKING).choices
    assert choice.finish_reason == "length"


def forced_thought_grammar() -> str:
    tokenizer = qwen3_tokenizer()
    start, end = (tokenizer.convert_tokens_to_ids(marker) for marker in ("<think>", "</think>"))
    return (f'start: <[{start}]> "the codename is osprey, keep it quiet" <[{end}]> '
            '"\\n\\nThe osprey answer is yes."\n')


@pytest.mark.parametrize("stream", [False, True])
def test_output_rails_filter_the_reasoning_too(server, client, stream):
    body = dict(model=MODEL, messages=MESSAGES, temperature=0.0, max_tokens=60,
                extra_body={"structured_outputs": {"grammar": forced_thought_grammar()}})
    if stream:
        request_id, reasoning, content = stream_reasoning(client, **body)
    else:
        response = client.chat.completions.create(**body)
        (choice,) = response.choices
        request_id, reasoning, content = response.id, choice.message.reasoning_content, choice.message.content
    assert reasoning.startswith("the codename is ") and "osprey" not in reasoning and "REDACTED" in reasoning
    assert content.strip().startswith("The ") and "osprey" not in content and "REDACTED" in content
    # the audit log has the decision for each of the two matches, the one in the thought included
    with open(server.audit_path) as file:
        records = [json.loads(line) for line in file]
    redactions = [record for record in records if record["request_id"] == request_id
                  and record["direction"] == "output" and record["action"] == "redact"]
    assert len(redactions) == 2, records


def stream_reasoning(client, **body) -> tuple[str, str, str]:
    """(request id, reasoning, content) of a streamed choice."""
    reasoning, content, request_id = [], [], None
    for chunk in client.chat.completions.create(stream=True, **body):
        request_id = chunk.id
        delta = chunk.choices[0].delta
        reasoning.append(getattr(delta, "reasoning_content", None) or "")
        content.append(delta.content or "")
    return request_id, "".join(reasoning), "".join(content)
