"""The `serval` command: flags map to EngineConfig with vLLM's names; `generate` prints what LLM generates."""
import json
import subprocess
import sys

import pytest

from tests.e2e.server import REPO_ROOT, tiny_model_dir
from serval.cli import build_parser, engine_config_from_args, expand_config_file, main
from serval.config import EngineConfig


def test_every_engine_field_is_a_kebab_case_flag():
    args = build_parser().parse_args(["serve"])
    for name in EngineConfig.field_names():
        assert hasattr(args, name), name


def test_flags_map_to_engine_config():
    args = build_parser().parse_args([
        "serve", "--model", "/m", "--max-model-len", "512", "--max-num-seqs", "8", "--block-size", "32",
        "--no-enable-prefix-caching", "--no-enable-chunked-prefill", "--max-num-batched-tokens", "512",
        "--gpu-memory-utilization", "0.5", "--dtype", "float16", "--seed", "3", "--load-format", "dummy",
        "--num-gpu-blocks-override", "100", "--kv-cache-memory-bytes", "1000000", "--scheduling-policy",
        "priority", "--device", "cpu"])
    config = engine_config_from_args(args)
    assert config == EngineConfig(model="/m", max_model_len=512, max_num_seqs=8, block_size=32,
                                  enable_prefix_caching=False, enable_chunked_prefill=False,
                                  max_num_batched_tokens=512, gpu_memory_utilization=0.5, dtype="float16",
                                  seed=3, load_format="dummy", num_gpu_blocks_override=100,
                                  kv_cache_memory_bytes=1000000, scheduling_policy="priority", device="cpu")


def test_serve_defaults():
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.api_key, args.max_waiting_requests) == ("0.0.0.0", 8000, None, None)
    assert engine_config_from_args(args) == EngineConfig()


def run_cli(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serval.cli", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=timeout)


def test_invalid_engine_argument_exits_with_its_name():
    result = run_cli("serve", "--dtype", "int3")
    assert result.returncode == 2 and "dtype" in result.stderr and "int3" in result.stderr


def test_positional_and_flag_model_must_agree():
    result = run_cli("serve", "/a", "--model", "/b")
    assert result.returncode == 2 and "twice" in result.stderr


def test_generate_prints_the_offline_engines_text():
    from serval import LLM, SamplingParams
    model = tiny_model_dir()
    expected = LLM(model=model, max_model_len=256).generate(
        "Hello there", SamplingParams(max_tokens=5, temperature=0), use_tqdm=False)[0].outputs[0].text
    result = run_cli("generate", "Hello there", "--model", model, "--max-model-len", "256", "--max-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_generate_chat():
    result = run_cli("generate", "Hi", "--chat", "--model", tiny_model_dir(), "--max-model-len", "256",
                     "--max-tokens", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


@pytest.mark.parametrize("command", ["bench", "advise"])
def test_bench_and_advise_are_serval_subcommands(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"serval {command}" in capsys.readouterr().out


def test_invalid_policy_file_exits_2_before_loading_a_model(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("keys: [1, 2\n")
    assert main(["serve", "--policy", str(policy)]) == 2


@pytest.mark.parametrize("flags,named", [
    (["--pipeline-parallel-size", "2"], "--pipeline-parallel-size"),
    (["--data-parallel-size", "4"], "--data-parallel-size"),
    (["--default-chat-template-kwargs", "{not json"], "--default-chat-template-kwargs"),
    (["--default-chat-template-kwargs", "[1]"], "--default-chat-template-kwargs"),
    (["--default-chat-template-kwargs", '{"add_generation_prompt": false}'], "add_generation_prompt")])
def test_vllm_flags_with_values_serval_cannot_take_exit_2_naming_them(flags, named, capfd):
    """vLLM's flags are accepted (tests/e2e/test_vllm_flags.py); a value Serval can't serve is refused by name
    before a model loads."""
    assert main(["serve", *flags]) == 2
    (line,) = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    assert line["message"] == "invalid server argument" and named in line["error"]


def test_a_config_file_gives_flags_and_the_command_line_wins(tmp_path):
    """vLLM's `serve --config FILE`: snake or kebab keys, switches on and off, lists, mappings as JSON."""
    config = tmp_path / "serve.yaml"
    config.write_text("model: /models/m\nmax_model_len: 4096\nmax-num-seqs: 8\nenable-prefix-caching: false\n"
                      "enforce_eager: true\nserved-model-name: [a, b]\ndisable-log-requests: true\n"
                      "default-chat-template-kwargs: {enable_thinking: false}\nspeculative_config:\n"
                      "  method: ngram\n  num_speculative_tokens: 3\n  prompt_lookup_max: 4\n")
    parser = build_parser()
    argv = expand_config_file(parser, ["serve", "--config", str(config), "--max-num-seqs", "16"])
    args = parser.parse_args(argv)
    engine = engine_config_from_args(args)
    assert (engine.model, engine.max_model_len, engine.max_num_seqs) == ("/models/m", 4096, 16)
    assert engine.enable_prefix_caching is False and engine.enforce_eager is True
    spec = engine.speculative_config
    assert (spec.method, spec.num_speculative_tokens, spec.prompt_lookup_max) == ("ngram", 3, 4)
    assert args.served_model_name == ["a", "b"] and args.disable_log_requests
    assert json.loads(args.default_chat_template_kwargs) == {"enable_thinking": False}
    # vLLM's `serve MODEL --config FILE`: the positional model is not taken for one more served name
    config.write_text("served-model-name: [a, b]\n")
    args = parser.parse_args(expand_config_file(parser, ["serve", "/models/p", "--config", str(config)]))
    assert args.model_tag == "/models/p" and args.served_model_name == ["a", "b"]


@pytest.mark.parametrize("text,named", [("max-model-lenn: 5\n", "max-model-lenn"), ("[1, 2]\n", "mapping")])
def test_a_config_file_with_an_unknown_flag_exits_2_naming_it(tmp_path, text, named, capsys):
    config = tmp_path / "serve.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--config", str(config)])
    assert exit_info.value.code == 2 and named in capsys.readouterr().err
