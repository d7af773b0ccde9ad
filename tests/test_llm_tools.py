"""LLM.chat with tools and a reasoning parser, offline, on a tiny random-weight Qwen3 with Qwen3's real tokenizer
and chat template: tool_choice "required" and a named function give calls whose arguments validate against the
schema (jsonschema), the think section lands in reasoning_content, and bad tool arguments are InvalidArgument
naming the field, as the server's 400s do."""
import json

import jsonschema
import pytest

from serval import LLM, SamplingParams
from serval.openai.errors import InvalidArgument
from tests.e2e.test_tools import SCHEMAS, TOOLS
from tests.e2e.tiny_qwen3 import tiny_qwen3_dir
from tests.openai.tool_parsers.streaming import qwen3_tokenizer

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
NO_THINKING = {"enable_thinking": False}


@pytest.fixture(scope="module")
def llm():
    return LLM(model=tiny_qwen3_dir(), tool_call_parser="hermes", reasoning_parser="qwen3", max_model_len=1024,
               max_num_seqs=16)


@pytest.mark.parametrize("tool_choice, allowed", [
    ("required", set(SCHEMAS)), ({"type": "function", "function": {"name": "book_table"}}, {"book_table"})])
def test_forced_calls_validate(llm, tool_choice, allowed):
    params = SamplingParams(n=12, temperature=1.0, seed=0, max_tokens=64)
    (output,) = llm.chat(MESSAGES, params, use_tqdm=False, tools=TOOLS, tool_choice=tool_choice,
                         parallel_tool_calls=False, chat_template_kwargs=NO_THINKING)
    for completion in output.outputs:
        (call,) = completion.tool_calls
        assert call.name in allowed and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
        assert completion.text.startswith("<tool_call>\n") and completion.reasoning_content is None


def test_tools_are_rendered_by_the_template(llm):
    (output,) = llm.chat(MESSAGES, SamplingParams(max_tokens=1), use_tqdm=False, tools=TOOLS, tool_choice="none")
    reference = qwen3_tokenizer().apply_chat_template(MESSAGES, tools=TOOLS, tokenize=False,
                                                      add_generation_prompt=True)
    assert output.prompt_token_ids == qwen3_tokenizer().encode(reference, add_special_tokens=False)
    assert output.outputs[0].tool_calls == []


def test_thought_goes_to_reasoning_content(llm):
    params = SamplingParams(temperature=0.0, max_tokens=6)
    (output,) = llm.chat(MESSAGES, params, use_tqdm=False)
    (completion,) = output.outputs
    assert completion.reasoning_content == completion.text.removeprefix("<think>") and completion.text
    assert completion.tool_calls == []


@pytest.mark.parametrize("tools, tool_choice, param", [
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], None,
     "tools[0].function.parameters"),
    (TOOLS, {"type": "function", "function": {"name": "missing"}}, "tool_choice"),
    (None, "required", "tool_choice"),
    (TOOLS, "sometimes", "tool_choice"),
])
def test_bad_tools_name_the_field(llm, tools, tool_choice, param):
    with pytest.raises(InvalidArgument) as raised:
        llm.chat(MESSAGES, use_tqdm=False, tools=tools, tool_choice=tool_choice)
    assert raised.value.param == param


def test_unknown_parser_names_are_refused():
    with pytest.raises(InvalidArgument, match="hermes"):
        LLM(model=tiny_qwen3_dir(), tool_call_parser="bogus")
