"""benchmarks/tool_bench.py's checkpoint: transformers renders its Llama 3.1-style template with tools, a past call
and the call's result; the call as rendered is what the llama3_json parser reads back; and the written directory
loads as a transformers tokenizer with the Llama 3 vocabulary; and a --tiny run with --profile-steps end to end."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import transformers

from serval.bench.tools import BUILTIN_TOOLS
from serval.openai.tool_parsers import get_tool_parser

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "tool_bench.py")


def load_script():
    spec = importlib.util.spec_from_file_location("tool_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_template_renders_tools_and_calls_the_parser_reads(tmp_path):
    tool_bench = load_script()
    path = tool_bench.write_model_dir(str(tmp_path), tiny=True)
    assert json.load(open(os.path.join(path, "config.json")))["vocab_size"] == 128256
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    arguments = {"city": "Paris", "days": 2}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "22 C"}]
    text = tokenizer.apply_chat_template(messages, tools=BUILTIN_TOOLS, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython")
    for tool in BUILTIN_TOOLS:
        assert json.dumps(tool) in text
    assert "Be brief.<|eot_id|>" in text and "<|start_header_id|>ipython<|end_header_id|>\n\n22 C<|eot_id|>" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    call_text = text.split("<|start_header_id|>assistant<|end_header_id|>\n\n")[1].split("<|eom_id|>")[0]
    parsed = get_tool_parser("llama3_json")(BUILTIN_TOOLS).extract(call_text)
    assert [(call.name, json.loads(call.arguments)) for call in parsed.tool_calls] == [("get_weather", arguments)]
    assert parsed.content is None
    without_tools = tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert "Environment" not in without_tools and "Weather in Paris?<|eot_id|>" in without_tools


def test_tiny_run_profiles_each_choice(tmp_path):
    """--tiny --profile-steps end to end on the CPU, the engine in its own process: the timed runs, then one
    profiled run per tool_choice whose trace summary lands in the JSON and the printed table."""
    out = tmp_path / "tool"
    # 48 tokens an answer (tiny's default is 16): the profile starts once every chat decodes, a few steps in, and
    # its 3 steps must come before the chats end, also on a loaded CI machine (16 left 2.75 there once)
    done = subprocess.run([sys.executable, SCRIPT, "--tiny", "--engine-process", "on", "--choices", "none,required",
                           "--output-len", "48", "--profile-steps", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.load(open(out / "tool_bench.json"))
    assert set(report["results"]) == set(report["profiles"]) == {"none", "required"}
    for choice, profiled in report["profiles"].items():
        assert os.path.exists(profiled["trace"]) and profiled["decode_steps_seen"] >= 3
        summary = profiled["summary"]
        assert summary["num_steps"] >= 3 and "serval.execute" in summary["ranges_ms_per_step"]["engine"]
        assert f"profile of tool_choice={choice}" in done.stdout
    # Only the constrained run fills grammar masks.
    assert "serval.grammar_join" in report["profiles"]["required"]["summary"]["ranges_ms_per_step"]["engine"]
    assert "serval.grammar_join" not in report["profiles"]["none"]["summary"]["ranges_ms_per_step"]["engine"]
