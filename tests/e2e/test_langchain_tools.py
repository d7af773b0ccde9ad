"""LangChain against a real `serval serve --tool-call-parser hermes --enable-auto-tool-choice` (a tiny random-weight
Qwen3 with Qwen3's real tokenizer and chat template): `ChatOpenAI.bind_tools` with a forced tool choice returns
tool calls LangChain parses, `.with_structured_output(PydanticModel)` returns a valid object, and an agent loop
(call, tool result message, final answer) completes, with the history rendered as transformers renders it."""
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from tests.e2e.server import RemoteServer
from tests.e2e.tiny_qwen3 import tiny_qwen3_dir
from tests.openai.tool_parsers.streaming import qwen3_tokenizer

langchain_openai = pytest.importorskip("langchain_openai")
from langchain_core.messages import HumanMessage, ToolMessage  # noqa: E402

MODEL = "tiny-qwen3"


class GetWeather(BaseModel):
    """The weather in a city, for the next few days."""
    city: str = Field(max_length=8)
    days: int = Field(ge=1, le=7)


class Verdict(BaseModel):
    answer: Literal["yes", "no"]
    confidence: int = Field(ge=0, le=9)


@pytest.fixture(scope="module")
def server():
    remote = RemoteServer(["--model", tiny_qwen3_dir(), "--max-model-len", "1024", "--served-model-name", MODEL,
                           "--tool-call-parser", "hermes", "--enable-auto-tool-choice"])
    yield remote
    remote.close()


def chat_model(server, **kwargs):
    return langchain_openai.ChatOpenAI(base_url=server.url + "/v1", api_key="none", model=MODEL, max_retries=0,
                                       timeout=300, **{"max_tokens": 80, "temperature": 0.0, **kwargs})


@pytest.mark.parametrize("tool_choice", ["GetWeather", "any", "required"])
def test_bind_tools_with_a_forced_choice_returns_calls(server, tool_choice):
    llm = chat_model(server, temperature=1.0, seed=1)
    message = llm.bind_tools([GetWeather], tool_choice=tool_choice, parallel_tool_calls=False).invoke(
        "Weather in Paris?")
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert not message.invalid_tool_calls
    (call,) = message.tool_calls
    assert call["name"] == "GetWeather" and call["id"].startswith("call_")
    GetWeather.model_validate(call["args"])


def test_streamed_bind_tools_gives_the_same_call(server):
    bound = chat_model(server).bind_tools([GetWeather], tool_choice="GetWeather", parallel_tool_calls=False)
    whole = bound.invoke("Weather in Paris?")
    streamed = None
    for chunk in bound.stream("Weather in Paris?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert [(call["name"], call["args"]) for call in streamed.tool_calls] == \
        [(call["name"], call["args"]) for call in whole.tool_calls]
    GetWeather.model_validate(whole.tool_calls[0]["args"])


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_returns_a_valid_object(server, method):
    # strict, as OpenAI requires for guaranteed schemas: no properties beyond the model's (a random-weight model
    # would otherwise invent extra keys until max_tokens)
    structured = chat_model(server, temperature=1.0, seed=2).with_structured_output(Verdict, method=method,
                                                                                   strict=True)
    result = structured.invoke("Will it rain?")
    assert isinstance(result, Verdict)


def test_agent_loop_call_result_answer(server):
    llm = chat_model(server)
    history = [HumanMessage("What is the weather in Paris?")]
    request = llm.bind_tools([GetWeather], tool_choice="GetWeather", parallel_tool_calls=False).invoke(history)
    (call,) = request.tool_calls
    history += [request, ToolMessage(content=f"sunny in {call['args']['city']}", tool_call_id=call["id"])]
    answer = llm.bind_tools([GetWeather]).invoke(history, tool_choice="none", max_tokens=12)
    assert isinstance(answer.content, str) and answer.content and not answer.tool_calls
    assert answer.response_metadata["finish_reason"] in ("stop", "length")
    # the server rendered the call and its result the way transformers renders them
    hf_history = [{"role": "user", "content": history[0].content},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"id": call["id"], "type": "function",
                       "function": {"name": "GetWeather", "arguments": call["args"]}}]},
                  {"role": "tool", "tool_call_id": call["id"], "content": history[2].content}]
    tools = [{"type": "function", "function": {
        "name": "GetWeather", "description": GetWeather.__doc__, "parameters": {
            "properties": {"city": {"maxLength": 8, "type": "string"},
                           "days": {"maximum": 7, "minimum": 1, "type": "integer"}},
            "required": ["city", "days"], "type": "object"}}}]
    text = qwen3_tokenizer().apply_chat_template(hf_history, tools=tools, tokenize=False, add_generation_prompt=True)
    assert answer.usage_metadata["input_tokens"] == len(qwen3_tokenizer().encode(text, add_special_tokens=False))
