"""chat_sampling_params: what a chat request's sampling params get from the server's tool and reasoning flags.
Checked on the deepseek formats, whose markers are special tokens and whose thinking is off unless asked."""
import pytest

from serval.openai.protocol import ChatCompletionRequest
from serval.sampling_params import SamplingParams
from serval.server.admission import chat_output_parsers, chat_sampling_params
from serval.server.config import ServerConfig
from tests.e2e.test_tools import TOOLS
from tests.openai.tool_parsers.streaming import deepseek_tokenizer

CONFIG = ServerConfig(tool_call_parser="deepseek_v3", reasoning_parser="deepseek_v3", enable_auto_tool_choice=True)


def params_for(**body) -> SamplingParams:
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=TOOLS, **body)
    parser = chat_output_parsers(CONFIG, request)()
    return chat_sampling_params(CONFIG, deepseek_tokenizer(), request, SamplingParams(), parser)


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
