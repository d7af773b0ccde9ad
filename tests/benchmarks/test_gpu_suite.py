"""benchmarks/gpu_suite.py's transformers side with --tiny on the CPU: the streamed continuous-batching loop the child
times generates what transformers' own generate_batch does, a finished child reports today's fields and numbers,
and a child stopped at its timeout reports the output tokens it had generated (its partial rate) beside the bound."""
from __future__ import annotations

import argparse
import json
import random
import time

import pytest
import torch

from benchmarks import gpu_suite
from serval.model.loader import load_model

# What a finished run has always reported (the full-run path must not change).
FULL_RUN_FIELDS = {"num_requests", "elapsed_s", "input_tokens", "output_tokens", "output_tokens_per_s",
                   "total_tokens_per_s", "attn_implementation"}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return gpu_suite.write_tiny_model(str(tmp_path_factory.mktemp("gpu_suite")))


def prompts(count: int) -> list[list[int]]:
    return gpu_suite.random_prompts(random.Random(0), count, 32, 32, gpu_suite.TINY_CONFIG["vocab_size"])


def test_streamed_loop_generates_what_generate_batch_does(tiny_model_dir, capsys, monkeypatch):
    from transformers import GenerationConfig
    from transformers.generation import ContinuousBatchingConfig
    model, hf_config = load_model(tiny_model_dir, load_format="dummy", dtype=torch.bfloat16, device="cpu", seed=0)
    hf = gpu_suite.hf_model_sharing_weights(model, hf_config)
    batch, new_tokens = prompts(6), 12
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    batching = ContinuousBatchingConfig(**gpu_suite.TINY_BATCHING)
    expected = hf.generate_batch(inputs=batch, generation_config=config, continuous_batching_config=batching)
    monkeypatch.setattr(gpu_suite, "PROGRESS_INTERVAL_S", 0.0)  # a line after every output
    capsys.readouterr()
    outputs = gpu_suite.generate_batch_with_progress(hf, batch, config, batching, time.perf_counter())
    assert {i: o.generated_tokens for i, o in outputs.items()} == {i: o.generated_tokens for i, o in expected.items()}
    progress = [json.loads(line)["generation_progress"] for line in capsys.readouterr().out.splitlines()]
    counts = [line["output_tokens"] for line in progress]
    assert counts == sorted(counts) and 0 < counts[0] < counts[-1] == len(batch) * new_tokens
    assert progress[-1]["finished_requests"] == len(batch)
    # Tokens count as they are generated, not when their request finishes (a stopped 512-request run may have none).
    assert progress[0]["finished_requests"] == 0 and progress[0]["output_tokens"] > 0

    result = gpu_suite.hf_generate_batch(hf, batch, new_tokens, gpu_suite.TINY_BATCHING)
    assert set(result) == FULL_RUN_FIELDS
    assert result["output_tokens"] == len(batch) * new_tokens and result["input_tokens"] == 32 * len(batch)
    assert result["output_tokens_per_s"] == result["output_tokens"] / result["elapsed_s"]


def test_child_finished_then_stopped_mid_run(tiny_model_dir, tmp_path):
    """The same child twice. Run to the end on 8 requests, it reports today's fields; its time before the timed run
    (imports, load, the warm-up on the first 8 requests: seconds that vary with the machine's load) sets the timeout
    of the second, on 1024 requests (far too many to finish), to stop it a few seconds into its timed part."""
    args = argparse.Namespace(out=str(tmp_path), model=tiny_model_dir, tiny=True)
    new_tokens = 64
    started = time.perf_counter()
    full = gpu_suite.hf_generate_batch_in_child(args, prompts(8), new_tokens, timeout_s=300)
    before_timed_run = time.perf_counter() - started - full["elapsed_s"]
    assert set(full) == FULL_RUN_FIELDS, full
    assert full["num_requests"] == 8 and full["output_tokens"] == 8 * new_tokens

    stopped = gpu_suite.hf_generate_batch_in_child(args, prompts(1024), new_tokens,
                                                   timeout_s=1.5 * before_timed_run + 3)
    asked = 1024 * new_tokens
    assert stopped["error"].startswith("did not finish"), stopped
    assert 0 < stopped["partial_output_tokens"] < asked == stopped["partial_output_tokens_asked"]
    assert 0 <= stopped["partial_finished_requests"] < 1024
    # The last progress line before the stop (one a second), not an earlier one.
    assert 0 < stopped["generation_s_at_least"] - stopped["partial_generation_s"] < 5
    assert stopped["partial_output_tokens_per_s"] == stopped["partial_output_tokens"] / stopped["partial_generation_s"]
    assert stopped["output_tokens_per_s_at_most"] == asked / stopped["generation_s_at_least"]
