"""SpeculativeConfig: vLLM's `speculative_config` (engine argument, `--speculative-config` JSON), validated once."""
from __future__ import annotations

import json
from dataclasses import dataclass

from serval.openai.errors import InvalidArgument

PARAM = "speculative_config"
# Methods that run here. The others vLLM knows are refused by name rather than silently ignored.
METHODS = ("ngram", "suffix", "draft_model", "eagle3", "replay")
NOT_YET = ("eagle", "medusa", "mtp")
# Methods whose `model` is a checkpoint the engine loads beside the target.
MODEL_METHODS = ("draft_model", "eagle3")
_KEYS = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "model",
         "disable_by_batch_size", "suffix_decoding_max_cached_requests", "suffix_decoding_max_tree_depth",
         "acceptance_rate", "seed"}


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    # draft_model: the draft checkpoint (it must share the target's tokenizer); eagle3: the EAGLE-3 head's directory
    model: str | None = None
    prompt_lookup_min: int = 1  # ngram: shortest suffix of the request's tokens to look up
    prompt_lookup_max: int = 3  # ngram: longest; longer matches are tried first
    # Steps with at least this many running requests don't speculate (verification then costs more than it saves);
    # None: always speculate.
    disable_by_batch_size: int | None = None
    suffix_decoding_max_cached_requests: int = 1000  # suffix: finished requests kept in the index
    suffix_decoding_max_tree_depth: int = 24  # suffix: longest suffix of the request matched against the index
    # replay (benchmarks only): each proposed token is the known continuation's with this probability, else wrong.
    acceptance_rate: float = 0.8
    seed: int = 0


def parse_speculative_config(value) -> SpeculativeConfig | None:
    """A dict, a JSON string or None → SpeculativeConfig; raises InvalidArgument naming what is wrong."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise InvalidArgument(PARAM, f"invalid {PARAM}: not JSON ({error})") from None
    if not isinstance(value, dict):
        raise InvalidArgument(PARAM, f"invalid {PARAM}={value!r}: expected a JSON object")
    unknown = sorted(set(value) - _KEYS)
    if unknown:
        raise InvalidArgument(PARAM, f"invalid {PARAM}: unknown key(s) {unknown}; allowed {sorted(_KEYS)}")
    method = value.get("method") or ("draft_model" if value.get("model") else None)
    if method in NOT_YET:
        raise InvalidArgument(PARAM, f"invalid {PARAM}: method {method!r} is not supported yet; supported: "
                                     f"{list(METHODS)}")
    if method not in METHODS:
        raise InvalidArgument(PARAM, f"invalid {PARAM}: method={method!r}; allowed {list(METHODS)}")
    fields = {key: item for key, item in value.items() if key != "method"}
    if "num_speculative_tokens" not in fields:
        raise InvalidArgument(PARAM, f"invalid {PARAM}: num_speculative_tokens is required")
    config = SpeculativeConfig(method=method, **fields)
    _validate(config)
    return config


def _validate(config: SpeculativeConfig) -> None:
    def bad(name: str, allowed: str) -> InvalidArgument:
        return InvalidArgument(PARAM, f"invalid {PARAM}: {name}={getattr(config, name)!r}; allowed {allowed}")

    if (config.method in MODEL_METHODS) != isinstance(config.model, str) or config.model == "":
        raise bad("model", f"a checkpoint path with method {' or '.join(MODEL_METHODS)}, and only then")

    for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
                 "suffix_decoding_max_cached_requests", "suffix_decoding_max_tree_depth"):
        if not _is_int(getattr(config, name)) or getattr(config, name) < 1:
            raise bad(name, "an integer >= 1")
    if config.num_speculative_tokens > 16:
        raise bad("num_speculative_tokens", "at most 16")
    if config.prompt_lookup_max < config.prompt_lookup_min:
        raise bad("prompt_lookup_max", f">= prompt_lookup_min ({config.prompt_lookup_min})")
    if config.disable_by_batch_size is not None and (not _is_int(config.disable_by_batch_size)
                                                     or config.disable_by_batch_size < 1):
        raise bad("disable_by_batch_size", "an integer >= 1 or null")
    rate = config.acceptance_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise bad("acceptance_rate", "a number in [0, 1]")
    if not _is_int(config.seed):
        raise bad("seed", "an integer")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
