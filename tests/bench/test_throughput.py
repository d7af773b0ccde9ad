"""Offline throughput on the default model: exact token counts, rates from the elapsed time."""
import pytest

from serval.bench.throughput import run_offline
from serval.bench.tokenizer import BenchTokenizer
from serval.bench.workloads import WorkloadConfig, build_workload


def test_offline_throughput_counts_every_token(default_llm):
    tokenizer = BenchTokenizer("engine", default_llm.get_tokenizer())
    workload = build_workload(WorkloadConfig("shared-prefix", num_prompts=4, input_len=8, output_len=3, prefix_len=16,
                                             num_groups=2), tokenizer)
    result = run_offline(default_llm, workload, tokenizer)
    assert result.num_requests == 4 and result.total_output_tokens == 4 * 3
    assert result.total_input_tokens == sum(len(tokenizer.encode(f"{r.system}\n\n{r.user}")) for r in workload)
    assert result.output_tokens_per_second == pytest.approx(12 / result.elapsed_s)
    assert result.to_json()["total_tokens_per_second"] == pytest.approx(
        (result.total_input_tokens + 12) / result.elapsed_s)
