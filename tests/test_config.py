"""EngineConfig: invalid engine arguments raise InvalidArgument naming the argument, the value and what is
allowed; long_prefill_token_threshold resolves to the per-request prefill cap the scheduler uses."""
import pytest

from serval.cli import build_parser, engine_config_from_args
from serval.config import LONG_PREFILL_BUDGET_FRACTION, EngineConfig
from serval.openai.errors import InvalidArgument

INVALID = [
    (dict(max_num_seqs=0), "max_num_seqs", "0", "an integer >= 1"),
    (dict(max_num_seqs=True), "max_num_seqs", "True", "an integer >= 1"),
    (dict(block_size=16.0), "block_size", "16.0", "an integer >= 1"),
    (dict(cudagraph_mixed_max_tokens=0), "cudagraph_mixed_max_tokens", "0", "an integer >= 1"),
    (dict(cudagraph_mixed_sizes="16,x"), "cudagraph_mixed_sizes", "'16,x'", "integers from 2 to 65536"),
    (dict(cudagraph_mixed_sizes=[1, 16]), "cudagraph_mixed_sizes", "[1, 16]", "integers from 2 to 65536"),
    (dict(cudagraph_mixed_sizes=[16, 2.5]), "cudagraph_mixed_sizes", "[16, 2.5]", "integers from 2"),
    (dict(cudagraph_mixed_sizes=""), "cudagraph_mixed_sizes", "''", "integers from 2"),
    (dict(cudagraph_mixed_sizes="70000"), "cudagraph_mixed_sizes", "'70000'", "integers from 2 to 65536"),
    (dict(max_model_len=False), "max_model_len", "False", "an integer >= 1 or None"),
    (dict(max_num_batched_tokens=-5), "max_num_batched_tokens", "-5", "an integer >= 1 or None"),
    (dict(long_prefill_token_threshold=-1), "long_prefill_token_threshold", "-1", "an integer >= 0 (0: no cap)"),
    (dict(long_prefill_token_threshold=True), "long_prefill_token_threshold", "True", "an integer >= 0"),
    (dict(long_prefill_token_threshold=2.5), "long_prefill_token_threshold", "2.5", "an integer >= 0"),
    (dict(seed=2**64), "seed", str(2**64), f"[{-2**63}, {2**63 - 1}]"),
    (dict(seed=None), "seed", "None", "an integer in"),
    (dict(gpu_memory_utilization=0.0), "gpu_memory_utilization", "0.0", "(0, 1]"),
    (dict(gpu_memory_utilization="0.5"), "gpu_memory_utilization", "'0.5'", "(0, 1]"),
    (dict(gpu_memory_utilization=True), "gpu_memory_utilization", "True", "(0, 1]"),
    (dict(enable_prefix_caching="no"), "enable_prefix_caching", "'no'", "True or False"),
    (dict(async_scheduling=1), "async_scheduling", "1", "True, False or None"),
    (dict(device="cuda:x"), "device", "'cuda:x'", "auto, cpu, cuda or cuda:N"),
    (dict(device=0), "device", "0", "auto, cpu, cuda or cuda:N"),
    (dict(dtype="int3"), "dtype", "'int3'", "one of"),
    (dict(model=3), "model", "3", "a path"),
    (dict(scheduling_policy="lifo"), "scheduling_policy", "'lifo'", "one of ['fcfs', 'priority']"),
    (dict(hf_overrides="{rope"), "hf_overrides", "'{rope'", "a JSON object"),
    (dict(hf_overrides="[1, 2]"), "hf_overrides", "'[1, 2]'", "a JSON object"),
    (dict(hf_overrides={1: 2}), "hf_overrides", "{1: 2}", "a JSON object"),
]


@pytest.mark.parametrize("kwargs, param, given, allowed", INVALID, ids=[str(case[0]) for case in INVALID])
def test_invalid_engine_argument_names_param_value_and_range(kwargs, param, given, allowed):
    with pytest.raises(InvalidArgument) as caught:
        EngineConfig(**kwargs)
    assert isinstance(caught.value, ValueError) and caught.value.param == param
    message = str(caught.value)
    assert message.startswith(f"invalid engine argument {param}={given}: allowed ")
    assert allowed in message.split("allowed ", 1)[1]


def test_unknown_engine_argument_is_named():
    with pytest.raises(InvalidArgument) as caught:
        EngineConfig.from_kwargs(max_num_seq=3)
    assert caught.value.param == "max_num_seq" and "max_num_seqs" in str(caught.value)


@pytest.mark.parametrize("budget, threshold, chunked, cap", [
    (2048, None, True, 2048 // LONG_PREFILL_BUDGET_FRACTION),  # on by default
    (2048, 100, True, 100),
    (2048, 0, True, 2048),  # 0: off
    (2048, 5000, True, 2048),  # not below the budget: off
    (3, None, True, 1),  # never 0, which would schedule nothing
    (4096, 100, False, 4096),  # without chunked prefill a prompt runs whole
])
def test_long_prefill_cap(budget, threshold, chunked, cap):
    config = EngineConfig(max_num_batched_tokens=budget, long_prefill_token_threshold=threshold,
                          enable_chunked_prefill=chunked)
    assert config.long_prefill_cap() == cap


def test_long_prefill_token_threshold_is_a_flag():
    parser = build_parser()
    assert engine_config_from_args(parser.parse_args(["serve"])).long_prefill_token_threshold is None
    args = parser.parse_args(["serve", "--long-prefill-token-threshold", "256"])
    assert engine_config_from_args(args).long_prefill_token_threshold == 256
    with pytest.raises(InvalidArgument, match="long_prefill_token_threshold=-4"):
        engine_config_from_args(parser.parse_args(["serve", "--long-prefill-token-threshold", "-4"]))


def test_hf_overrides_is_a_json_flag():
    args = build_parser().parse_args(["serve", "--hf-overrides", '{"max_position_embeddings": 4096}'])
    assert engine_config_from_args(args).hf_overrides == {"max_position_embeddings": 4096}
    assert EngineConfig(hf_overrides={"rms_norm_eps": 0.1}).hf_overrides == {"rms_norm_eps": 0.1}
