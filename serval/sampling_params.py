"""SamplingParams: what a request asks of the sampler and the stop checks, with vLLM's names and defaults.

Validated once, here, at the edge; the engine trusts it afterwards.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Below this temperature sampling is greedy (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5


def _bad(name: str, given, allowed: str) -> ValueError:
    return ValueError(f"invalid sampling parameter {name}={given!r}: allowed {allowed}")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Constrained decoding (vLLM's StructuredOutputsParams): exactly one of the constraints.

    json: a JSON schema (dict or its JSON text); json_object: any JSON object; regex: a regular expression
    (Rust regex syntax); choice: one of these strings; grammar: an EBNF (GBNF) or Lark grammar.
    """
    json: dict | str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) for c in self.choice) or not self.choice:
                raise _bad("structured_outputs.choice", self.choice, "a non-empty list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [name for name in STRUCTURED_KINDS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise _bad("structured_outputs", given or None, f"exactly one of {', '.join(STRUCTURED_KINDS)}")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise _bad("structured_outputs.json", self.json, "a JSON schema object")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise _bad(f"structured_outputs.{name}", value, "a non-empty string")

    @property
    def kind(self) -> str:
        return next(name for name in STRUCTURED_KINDS if getattr(self, name) not in (None, False))


STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: all tokens
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    detokenize: bool = True
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise _bad("n", self.n, "an integer >= 1")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise _bad("presence_penalty", self.presence_penalty, "[-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise _bad("frequency_penalty", self.frequency_penalty, "[-2, 2]")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise _bad("repetition_penalty", self.repetition_penalty, "(0, 2]")
        if not 0.0 <= self.temperature or self.temperature != self.temperature:
            raise _bad("temperature", self.temperature, ">= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise _bad("top_p", self.top_p, "(0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise _bad("top_k", self.top_k, "-1, 0 (all tokens) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            raise _bad("min_p", self.min_p, "[0, 1]")
        if self.seed is not None and not isinstance(self.seed, int):
            raise _bad("seed", self.seed, "an integer or None")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise _bad("max_tokens", self.max_tokens, "an integer >= 1 or None")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise _bad("min_tokens", self.min_tokens, "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _bad("min_tokens", self.min_tokens, f"<= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise _bad(name, value, "an integer >= 0 or None")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise _bad("stop", self.stop, "non-empty strings")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise _bad("structured_outputs", self.structured_outputs, "a StructuredOutputsParams")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise _bad("stop_token_ids", self.stop_token_ids, "non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def clone(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)
