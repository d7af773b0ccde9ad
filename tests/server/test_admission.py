"""chat_sampling_params: what a chat request's sampling params get from the server's tool and reasoning flags.
Checked on the deepseek formats, whose markers are special tokens and whose thinking is off unless asked, and on
gpt-oss's harmony format, whose tool grammar holds its own analysis and whose turn ends at `<|call|>`, on
Magistral's (`[THINK]` markers that are special tokens, a thought that may be left out) and on Phi-4-mini's
(a plain-text marker)."""
import pytest

from serval.openai.protocol import ChatCompletionRequest
from serval.sampling_params import SamplingParams, StructuredOutputsParams
from serval.server.admission import chat_output_parsers, chat_sampling_params
from serval.server.config import ServerConfig
from tests.e2e.test_tools import TOOLS
from tests.openai.tool_parsers.streaming import deepseek_tokenizer, harmony_tokenizer, magistral_tokenizer, qwen3_tokenizer

CONFIG = ServerConfig(tool_call_parser="deepseek_v3", reasoning_parser="deepseek_v3", enable_auto_tool_choice=True)


HARMONY = ServerConfig(tool_call_parser="openai", reasoning_parser="openai_gptoss", enable_auto_tool_choice=True)
MAGISTRAL = ServerConfig(tool_call_parser="mistral", reasoning_parser="mistral", enable_auto_tool_choice=True)
PHI4_MINI = ServerConfig(tool_call_parser="phi4_mini_json", enable_auto_tool_choice=True)


def params_for(config=CONFIG, tokenizer=deepseek_tokenizer, params=None, **body) -> SamplingParams:
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=TOOLS, **body)
    parser = chat_output_parsers(config, request)()
    return chat_sampling_params(config, tokenizer(), request, params or SamplingParams(), parser)


@pytest.mark.parametrize("kwargs, thinks", [(None, False), ({"thinking": False}, False), ({"thinking": True}, True),
                                            ({"enable_thinking": True}, True)])
def test_the_think_section_follows_deepseek_v3s_switch(kwargs, thinks):
    params = params_for(tool_choice="required", chat_template_kwargs=kwargs)
    grammar = params.structured_outputs.grammar
    assert grammar.startswith("start: constraint\n") is not thinks
    assert ("thought" in grammar) is thinks


def test_special_tokens_are_kept_for_the_markers():
    assert params_for(tool_choice="auto").skip_special_tokens is False
    assert params_for(tool_choice="none").skip_special_tokens is True


def test_harmony_keeps_markers_stops_at_turn_ends_and_wraps_its_analysis_once():
    added = harmony_tokenizer().get_added_vocab()
    params = params_for(HARMONY, harmony_tokenizer, SamplingParams(stop_token_ids=[5]), tool_choice="required")
    assert params.skip_special_tokens is False
    assert params.stop_token_ids == [5, added["<|return|>"], added["<|call|>"]]
    grammar = params.structured_outputs.grammar
    assert grammar.startswith("start: analysis? constraint\n") and grammar.count("analysis:") == 1
    assert "thought" not in grammar  # not wrapped in a `<think>` section too


def test_harmony_json_answer_is_the_final_message_after_analysis():
    json_answer = SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "integer"}))
    grammar = params_for(HARMONY, harmony_tokenizer, json_answer, tool_choice="none").structured_outputs.grammar
    added = harmony_tokenizer().get_added_vocab()
    assert grammar.startswith("start: analysis? constraint\n")
    assert f'constraint: <[{added["<|channel|>"]}]> "final" <[{added["<|message|>"]}]> answer' in grammar


def test_magistral_keeps_think_markers_and_its_thought_may_be_left_out():
    added = magistral_tokenizer().get_added_vocab()
    assert params_for(MAGISTRAL, magistral_tokenizer, tool_choice="none").skip_special_tokens is False
    grammar = params_for(MAGISTRAL, magistral_tokenizer, tool_choice="required").structured_outputs.grammar
    assert grammar.startswith(f"start: (<[{added['[THINK]']}]> thought)? ")
    assert f"<[{added['[TOOL_CALLS]']}]>" in grammar
    off = params_for(MAGISTRAL, magistral_tokenizer, tool_choice="required", chat_template_kwargs={
        "enable_thinking": False}).structured_outputs.grammar
    assert off == grammar  # the switch is not Magistral's: its parser reads a thought whatever the kwargs


def test_phi4_mini_required_grammar_writes_the_plain_text_marker():
    params = params_for(PHI4_MINI, qwen3_tokenizer, tool_choice="required")
    assert params.skip_special_tokens is True  # `functools[` is text: nothing to keep
    assert 'constraint: "functools[" function' in params.structured_outputs.grammar
