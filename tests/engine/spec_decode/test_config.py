"""speculative_config: vLLM's JSON, validated at the edge with errors that name what is wrong."""
import pytest

from serval.cli import build_parser, engine_config_from_args
from serval.config import EngineConfig
from serval.engine.spec_decode.config import SpeculativeConfig, parse_speculative_config
from serval.openai.errors import InvalidArgument


def test_parses_dict_and_json():
    config = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 5})
    assert config == SpeculativeConfig("ngram", 4, prompt_lookup_max=5)
    assert parse_speculative_config('{"method": "suffix", "num_speculative_tokens": 2}').method == "suffix"
    assert parse_speculative_config(None) is None
    # vLLM's shorthand: a model without a method is a draft model.
    assert parse_speculative_config({"model": "/d", "num_speculative_tokens": 2}) == SpeculativeConfig(
        "draft_model", 2, model="/d")


def test_cli_flag_reaches_the_engine_config():
    args = build_parser().parse_args(["serve", "--speculative-config",
                                      '{"method": "ngram", "num_speculative_tokens": 3}'])
    assert engine_config_from_args(args).speculative_config == SpeculativeConfig("ngram", 3)
    assert EngineConfig().speculative_config is None


@pytest.mark.parametrize("value, fragment", [
    ("{not json", "not JSON"),
    ([1, 2], "JSON object"),
    ({"method": "ngram"}, "num_speculative_tokens is required"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens=0"),
    ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens=True"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "prompt_lookup_max=2"),
    ({"method": "ngram", "num_speculative_tokens": 2, "typo": 1}, "unknown key(s) ['typo']"),
    ({"method": "medusa2", "num_speculative_tokens": 2}, "method='medusa2'"),
    ({"method": "eagle", "model": "/x", "num_speculative_tokens": 2}, "not supported yet"),
    ({"method": "eagle3", "num_speculative_tokens": 2}, "model=None"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "model=None"),
    ({"method": "ngram", "model": "/x", "num_speculative_tokens": 2}, "model='/x'"),
    ({"method": "replay", "num_speculative_tokens": 2, "acceptance_rate": 1.5}, "acceptance_rate=1.5"),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0}, "disable_by_batch_size=0"),
])
def test_invalid_configs_name_the_problem(value, fragment):
    with pytest.raises(InvalidArgument) as error:
        EngineConfig(speculative_config=value)
    assert error.value.param == "speculative_config"
    assert fragment in str(error.value)
