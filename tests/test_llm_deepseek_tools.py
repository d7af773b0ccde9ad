"""LLM.chat with the deepseek_v3 / deepseek_v31 tool parsers and the deepseek_v3 reasoning parser, end to end on a
tiny random-weight DeepseekV3ForCausalLM whose vocabulary holds DeepSeek's tool-call markers as special tokens
(tests/openai/tool_parsers/streaming.py says why it is Llama 3's BPE). tool_choice "required" and a named function
are forced by the grammar, so random weights at temperature 1.0 give calls that validate against the schema
(jsonschema); the markers reach the parser (special tokens kept in the text), and with thinking off by default
(deepseek_v3's switch) the grammar has no think section in front."""
import json

import jsonschema
import pytest

from serval import LLM, SamplingParams
from serval.openai.tool_parsers.deepseek import CALLS_BEGIN, CALLS_END
from tests.e2e.test_tools import SCHEMAS, TOOLS
from tests.model.tiny_models import build_tiny
from tests.openai.tool_parsers.streaming import deepseek_tokenizer

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
# The real template renders tools too; the parser and the grammar don't depend on how the prompt reads.
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<｜{{ message.role }}｜>{{ message.content }}"
                 "{% endfor %}<｜Assistant｜>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-deepseek-v3")
    tokenizer = deepseek_tokenizer()
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    build_tiny(path, "deepseek_v3", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    return str(path)


@pytest.mark.parametrize("parser, tool_choice, allowed", [
    ("deepseek_v3", "required", set(SCHEMAS)),
    ("deepseek_v31", {"type": "function", "function": {"name": "book_table"}}, {"book_table"})])
def test_forced_calls_validate(model_dir, parser, tool_choice, allowed):
    llm = LLM(model=model_dir, tool_call_parser=parser, reasoning_parser="deepseek_v3", max_model_len=256,
              max_num_seqs=8)
    params = SamplingParams(n=8, temperature=1.0, seed=0, max_tokens=96)
    (output,) = llm.chat(MESSAGES, params, use_tqdm=False, tools=TOOLS, tool_choice=tool_choice,
                         parallel_tool_calls=False)
    for completion in output.outputs:
        assert completion.text.startswith(CALLS_BEGIN) and completion.text.endswith(CALLS_END), completion.text
        (call,) = completion.tool_calls
        assert call.name in allowed and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
        assert completion.reasoning_content is None
