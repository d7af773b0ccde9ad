"""gpt-oss tool calls and reasoning through a real `serval serve --enable-auto-tool-choice --tool-call-parser openai
--reasoning-parser openai_gptoss` serving a tiny random-weight gpt-oss (tiny_gpt_oss.py), called with the official
`openai` client.

tool_choice "required" and a named function are enforced by the harmony grammar (an optional analysis message,
then `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>`), so even random weights
at temperature 1.0 give calls whose arguments validate against the tool's schema (jsonschema is the reference), the
analysis in `reasoning_content`, and no harmony marker anywhere the client sees. Streamed equals whole at
temperature 0."""
import pytest

from tests.e2e.server import RemoteServer
from tests.e2e.test_tools import MESSAGES, SCHEMAS, TOOLS, assert_valid_calls, stream_choice
from tests.e2e.tiny_gpt_oss import tiny_gpt_oss_dir
from serval.openai.tool_parsers.harmony_reader import SPECIAL_TOKENS
from tests.openai.tool_parsers.streaming import harmony_tokenizer

MODEL = "tiny-gpt-oss"


def end_bias() -> dict:
    """A random-weight model would think for ever: this makes `<|end|>` likely wherever the grammar allows it."""
    return {str(harmony_tokenizer().convert_tokens_to_ids("<|end|>")): 12.0}


@pytest.fixture(scope="module")
def client():
    remote = RemoteServer(["--model", tiny_gpt_oss_dir(), "--max-model-len", "1024", "--served-model-name", MODEL,
                           "--tool-call-parser", "openai", "--reasoning-parser", "openai_gptoss",
                           "--enable-auto-tool-choice", "--max-n", "32"])
    yield remote.client(timeout=300)
    remote.close()


def assert_no_markers(*texts):
    for text in texts:
        assert not any(marker in (text or "") for marker in SPECIAL_TOKENS), text


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "book_table"}}],
                         ids=["required", "named"])
def test_forced_calls_validate_at_temperature_one(client, tool_choice):
    allowed = {"book_table"} if isinstance(tool_choice, dict) else set(SCHEMAS)
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice, temperature=1.0, n=32, seed=1,
        max_tokens=96, logit_bias=end_bias())
    names = set()
    for choice in response.choices:
        calls = assert_valid_calls(choice, allowed)
        names |= {call.function.name for call in calls}
        assert_no_markers(getattr(choice.message, "reasoning_content", None),
                          *(call.function.arguments for call in calls))
    assert names == allowed


def test_streamed_equals_whole_at_temperature_zero(client):
    body = dict(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required", temperature=0.0,
                max_tokens=96, logit_bias=end_bias())
    (whole,) = client.chat.completions.create(**body).choices
    streamed = stream_choice(client, **body)
    assert streamed["finish_reason"] == whole.finish_reason == "tool_calls"
    assert [(call["name"], "".join(call["fragments"])) for call in streamed["calls"]] == \
        [(call.function.name, call.function.arguments) for call in whole.message.tool_calls]
    assert_valid_calls(whole, set(SCHEMAS))


def test_auto_leaks_no_marker(client):
    """The model's own (random) harmony is parsed: whatever it wrote, the client sees no marker."""
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, temperature=1.0, n=8,
                                              seed=2, max_tokens=48)
    for choice in response.choices:
        message = choice.message
        assert_no_markers(message.content, getattr(message, "reasoning_content", None),
                          *(call.function.arguments for call in message.tool_calls or []))


def test_call_ends_the_turn(client):
    """`<|call|>` is a stop token for the request (vLLM's harmony stop tokens), not only the model's EOS: a model
    that writes it stops there, instead of going on to write the tool's result itself."""
    call_token = str(harmony_tokenizer().convert_tokens_to_ids("<|call|>"))
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, temperature=1.0,
                                              max_tokens=32, logit_bias={call_token: 100.0})
    (choice,) = response.choices
    assert choice.finish_reason == "stop" and response.usage.completion_tokens == 1
    assert choice.message.content is None and not choice.message.tool_calls
