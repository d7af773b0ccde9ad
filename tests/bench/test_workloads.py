"""Workloads: requested lengths in the target tokenizer, vLLM's range ratio, shared prefixes, chat, jsonl."""
import json

import pytest

from serval.bench.tokenizer import load_tokenizer
from serval.bench.workloads import WorkloadConfig, build_workload


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("llama3")


def test_random_prompts_have_the_requested_token_lengths(tokenizer):
    workload = build_workload(WorkloadConfig("random", num_prompts=20, input_len=200, output_len=50,
                                             range_ratio=0.5, seed=1), tokenizer)
    assert all(100 <= r.prompt_len <= 300 and 25 <= r.output_len <= 75 for r in workload)
    assert sum(len(tokenizer.encode(r.user)) == r.prompt_len for r in workload) >= 18
    assert len({r.prompt_len for r in workload}) > 5
    again = build_workload(WorkloadConfig("random", num_prompts=20, input_len=200, output_len=50,
                                          range_ratio=0.5, seed=1), tokenizer)
    assert [r.user for r in again] == [r.user for r in workload]  # --seed reproduces the run


def test_fixed_lengths_are_exact(tokenizer):
    workload = build_workload(WorkloadConfig("random", num_prompts=10, input_len=64, output_len=8), tokenizer)
    assert [len(tokenizer.encode(r.user)) for r in workload] == [64] * 10
    assert {r.output_len for r in workload} == {8}


def test_shared_prefix_groups(tokenizer):
    workload = build_workload(WorkloadConfig("shared-prefix", num_prompts=12, input_len=32, prefix_len=256,
                                             num_groups=3), tokenizer)
    assert len({r.system for r in workload}) == 3
    assert all(len(tokenizer.encode(r.system)) == 256 and r.prompt_len == 256 + 32 for r in workload)


def test_long_context_defaults(tokenizer):
    config = WorkloadConfig("long-context", num_prompts=1)
    assert (config.input_len, config.output_len) == (32000, 128)
    [request] = build_workload(WorkloadConfig("long-context", num_prompts=1, input_len=8000), tokenizer)
    assert request.prompt_len == 8000


def test_chat_conversations(tokenizer):
    workload = build_workload(WorkloadConfig("chat", num_prompts=6, chat_turns=3, input_len=16), tokenizer)
    assert [(r.conversation_id, r.turn) for r in workload] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]


def test_jsonl(tmp_path, tokenizer):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "Hello there", "output_len": 7}) + "\n\n" +
                    json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}) + "\n")
    workload = build_workload(WorkloadConfig("jsonl", num_prompts=3, jsonl_path=str(path)), tokenizer)
    assert [r.output_len for r in workload] == [7, 3, 7]
    assert workload[1].messages == [{"role": "user", "content": "Hi"}]
    path.write_text(json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(ValueError, match="line 1"):
        build_workload(WorkloadConfig("jsonl", num_prompts=1, jsonl_path=str(path)), tokenizer)


@pytest.mark.parametrize("kwargs, message", [(dict(name="sharegpt"), "allowed: random"),
                                             (dict(range_ratio=1.0), "range-ratio"),
                                             (dict(name="jsonl"), "dataset-path")])
def test_bad_workload_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WorkloadConfig(**kwargs)
