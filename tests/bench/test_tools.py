"""Tools in chat workloads: the options' checks, and `serval bench serve --tool-workload` against a real
`serval serve --tool-call-parser hermes --enable-auto-tool-choice` (tiny random-weight Qwen3 with Qwen3's tokenizer
and template): with `required` every request makes a call, its streamed tool-call fragments time the stream, and
output tokens are the server's usage (the call's tokens included); with `none` no call is parsed."""
from __future__ import annotations

import json

import jsonschema
import pytest

from serval.bench.cli import main
from serval.bench.endpoints import Endpoint
from serval.bench.loadgen import LoadConfig, build_body, run_endpoint
from serval.bench.tokenizer import load_tokenizer
from serval.bench.tools import BUILTIN_TOOLS, ToolOptions, load_tools, tool_options
from serval.bench.workloads import BenchRequest
from tests.e2e.server import RemoteServer
from tests.e2e.tiny_qwen3 import tiny_qwen3_dir

MODEL = "tiny-qwen3"


def test_options_and_their_errors(tmp_path):
    for tool in BUILTIN_TOOLS:  # each built-in schema is a valid JSON schema
        jsonschema.validators.validator_for({}).check_schema(tool["function"].get("parameters", {}))
    assert ToolOptions(BUILTIN_TOOLS, "get_weather").body_fields()["tool_choice"] == \
        {"type": "function", "function": {"name": "get_weather"}}
    assert ToolOptions(BUILTIN_TOOLS, "required").body_fields() == {"tools": BUILTIN_TOOLS, "tool_choice": "required"}
    with pytest.raises(ValueError, match="--tool-choice"):
        ToolOptions(BUILTIN_TOOLS, "nope")
    with pytest.raises(ValueError, match="non-empty"):
        ToolOptions([{"type": "function", "function": {}}])
    path = tmp_path / "tools.json"
    path.write_text(json.dumps({"tools": BUILTIN_TOOLS[:1]}))
    assert load_tools(str(path), False) == BUILTIN_TOOLS[:1]
    with pytest.raises(ValueError, match="not both"):
        load_tools(str(path), True)
    with pytest.raises(ValueError, match="needs --tools"):
        tool_options(None, False, "required", "chat")
    with pytest.raises(ValueError, match="--api chat"):
        tool_options(None, True, None, "completions")
    assert tool_options(None, False, None, "chat") is None
    assert tool_options(None, True, None, "chat").tool_choice == "auto"
    request = BenchRequest(user="hi", output_len=4, prompt_len=1)
    body = build_body(Endpoint("e", "http://x", "m", api="chat"), request, [], True, ToolOptions(BUILTIN_TOOLS, "none"))
    assert body["tools"] == BUILTIN_TOOLS and body["tool_choice"] == "none"
    assert "tools" not in build_body(Endpoint("e", "http://x", "m"), request, [], True, ToolOptions(BUILTIN_TOOLS))


@pytest.fixture(scope="module")
def server():
    remote = RemoteServer(["--model", tiny_qwen3_dir(), "--max-model-len", "2048", "--served-model-name", MODEL,
                           "--tool-call-parser", "hermes", "--enable-auto-tool-choice"])
    yield remote
    remote.close()


def test_required_calls_are_timed_and_counted_from_usage(server):
    workload = [BenchRequest(user=f"Plan a trip number {index}.", output_len=48, prompt_len=6) for index in range(4)]
    endpoint = Endpoint("serval", server.url, MODEL, api="chat")
    tokenizer = load_tokenizer("qwen3")
    required = run_endpoint(endpoint, workload, LoadConfig(progress=False, ignore_eos=False,
                                                           tools=ToolOptions(BUILTIN_TOOLS, "required")), tokenizer)
    for result in required:
        assert result.success, result.error
        assert result.tool_calls >= 1 and result.output_text == ""  # the answer is calls only
        assert result.usage_from_server and result.output_tokens > 1
        assert result.ttft is not None and result.tpot is not None  # the call's fragments time the stream
    none = run_endpoint(endpoint, workload[:2], LoadConfig(progress=False, tools=ToolOptions(BUILTIN_TOOLS, "none")),
                        tokenizer)
    for result in none:
        assert result.success and result.tool_calls == 0 and result.output_tokens == 48  # ignore_eos: fixed length


def test_the_cli_reports_tool_calls(server, tmp_path, capsys):
    assert main(["serve", "--base-url", server.url, "--model", MODEL, "--api", "chat", "--tool-workload",
                 "--tool-choice", "get_weather", "--tokenizer", "qwen3", "--num-prompts", "3", "--input-len", "16",
                 "--output-len", "32", "--no-ignore-eos", "--disable-tqdm", "--no-plots",
                 "--result-dir", str(tmp_path)]) == 0
    assert "Requests with tool calls" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())["endpoints"][0]["runs"][0]["summary"]
    assert summary["completed"] == 3 and summary["requests_with_tool_calls"] == 3 and summary["usage_from_server"]
    assert summary["tpot_ms"]["p50"] is not None and summary["output_throughput"] > 0
