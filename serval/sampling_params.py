"""SamplingParams: what a request asks of the sampler and the stop checks, with vLLM's names and defaults.

Validated once, here, at the edge; the engine trusts it afterwards.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

from serval.openai.errors import InvalidArgument

# Below this temperature sampling is greedy (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5
# torch's int64 range, as vLLM's OpenAI protocol bounds seed. The engine seeds choice i of n with seed + i, and
# torch.Generator.manual_seed takes up to 2**64 - 1, so every seed here plus any index below MAX_N fits.
SEED_RANGE = (-2**63, 2**63 - 1)
# The most choices one request may ask for. Far above any real use (OpenAI allows 128, and the server bounds n
# itself); it stops a request from making millions of sequences at once.
MAX_N = 1024
_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
                "detokenize")


def _bad(name: str, given, allowed: str) -> InvalidArgument:
    """name is the field, which is also the OpenAI (or vLLM extension) body field a server fills it from."""
    return InvalidArgument(name, f"invalid sampling parameter {name}={given!r}: allowed {allowed}")


def _is_int(value) -> bool:
    """An integer (numpy's too), but not a bool: Python's bool is an int subclass, and True is no token count."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_token_id(value) -> bool:
    return _is_int(value) and value >= 0


def _token_id_list(name: str, value) -> list[int]:
    """A list of non-negative integer ids; the engine checks the upper bound, as only it knows the vocabulary."""
    if value is None:
        return []
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise _bad(name, value, "a list of non-negative integer token ids")
    ids = list(value)
    if plain_token_ids(ids):  # at C speed: a server builds these on its event loop, from lists of any length
        return ids
    bad = [token_id for token_id in ids if not _is_token_id(token_id)]
    if bad:
        raise _bad(name, bad[:5], "non-negative integer token ids")
    return [int(token_id) for token_id in ids]


def plain_token_ids(ids: list, vocab_size: int | None = None) -> bool:
    """True when ids are all Python ints in [0, vocab_size) (no bound: any non-negative), checked in C (map, min,
    max); False also where a slower look may still accept them (numpy integers) or must name the bad ones."""
    if not set(map(type, ids)) <= {int}:
        return False
    return not ids or (min(ids) >= 0 and (vocab_size is None or max(ids) < vocab_size))


def _allowed_token_ids(value) -> list[int] | None:
    """None allows every token; an empty list would allow none, which no request can mean."""
    if value is None:
        return None
    ids = _token_id_list("allowed_token_ids", value)
    if not ids:
        raise _bad("allowed_token_ids", value, "a non-empty list of non-negative integer token ids, or None")
    return ids


def _bad_words(value) -> list[str] | None:
    """Words must hold something besides whitespace: the engine tokenizes each with its leading whitespace
    stripped, and an empty word has no token to ban."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise _bad("bad_words", value, "a list of strings")
    words = list(value)
    bad = [word for word in words if not isinstance(word, str) or not word.strip()]
    if bad:
        raise _bad("bad_words", bad[:5], "strings with at least one non-whitespace character")
    return words


def _bad_words_token_ids(value) -> list[list[int]] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise _bad("bad_words_token_ids", value, "a list of lists of non-negative integer token ids")
    sequences = [_token_id_list("bad_words_token_ids", word) for word in value]
    if not all(sequences):
        raise _bad("bad_words_token_ids", [], "non-empty lists of non-negative integer token ids")
    return sequences


def _logit_bias(value) -> dict[int, float] | None:
    """Keys are token ids (integers, or their decimal strings as JSON object keys arrive); values finite numbers."""
    if not value:
        return None
    if not isinstance(value, dict):
        raise _bad("logit_bias", value, "a mapping of token ids to biases")
    bias = {}
    for key, given in value.items():
        token_id = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else key
        if not _is_token_id(token_id):
            raise _bad("logit_bias", {key: given}, "non-negative integer token ids as keys")
        if not _is_number(given) or not math.isfinite(given):
            raise _bad("logit_bias", {key: given}, "finite numbers as biases")
        bias[int(token_id)] = float(given)
    return bias


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
            if (isinstance(self.choice, str) or not isinstance(self.choice, (list, tuple))
                    or not all(isinstance(c, str) for c in self.choice) or not self.choice):
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
    allowed_token_ids: list[int] | None = None  # vLLM's: only these tokens may be sampled (None: every token)
    # vLLM's: words not to generate, tokenized by the engine into bad_words_token_ids
    # (serval.engine.input_processor.bad_words_token_ids says which spellings are banned).
    bad_words: list[str] | None = None
    # The token sequences the sampler bans: where a sequence's other tokens were generated last, its last token gets
    # -inf (a one-token sequence's, always). Filled from bad_words by the input processor, which holds the tokenizer
    # (vLLM's update_from_tokenizer), where not filled yet: the server tokenizes the words on its worker thread
    # (prepare_sampling) so that add_request, on the event loop, does not. Given without bad_words, banned as given.
    bad_words_token_ids: list[list[int]] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    detokenize: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    # True: this request decodes one token per step even where the engine speculates (serval.engine.spec_decode).
    disable_speculation: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and not isinstance(self.stop, (list, tuple)):
            raise _bad("stop", self.stop, "a string, a list of strings or None")
        self.stop = list(self.stop or [])
        self.stop_token_ids = _token_id_list("stop_token_ids", self.stop_token_ids)
        self.logit_bias = _logit_bias(self.logit_bias)
        self.allowed_token_ids = _allowed_token_ids(self.allowed_token_ids)
        self.bad_words = _bad_words(self.bad_words)
        self.bad_words_token_ids = _bad_words_token_ids(self.bad_words_token_ids)
        self._validate()

    def _validate(self) -> None:
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise _bad("n", self.n, f"an integer in [1, {MAX_N}]")
        self._check_number("presence_penalty", -2.0, 2.0, "a number in [-2, 2]")
        self._check_number("frequency_penalty", -2.0, 2.0, "a number in [-2, 2]")
        self._check_number("repetition_penalty", 0.0, 2.0, "a number in (0, 2]", low_open=True)
        self._check_number("temperature", 0.0, math.inf, "a finite number >= 0")
        self._check_number("top_p", 0.0, 1.0, "a number in (0, 1]", low_open=True)
        self._check_number("min_p", 0.0, 1.0, "a number in [0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise _bad("top_k", self.top_k, "-1, 0 (all tokens) or a positive integer")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise _bad("seed", self.seed, f"an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] or None")
        # 0 scores a prompt: its prompt logprobs are the answer and nothing is generated (evaluation harnesses).
        lowest = 0 if self.prompt_logprobs is not None else 1
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < lowest):
            raise _bad("max_tokens", self.max_tokens, "an integer >= 1 or None (0 only with prompt_logprobs: "
                       "scoring the prompt)")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise _bad("min_tokens", self.min_tokens, "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _bad("min_tokens", self.min_tokens, f"<= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise _bad(name, value, "an integer >= 0 or None")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise _bad("stop", self.stop, "non-empty strings")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "true or false")
        if not isinstance(self.disable_speculation, bool):
            raise _bad("disable_speculation", self.disable_speculation, "true or false")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise _bad("structured_outputs", self.structured_outputs, "a StructuredOutputsParams")

    def _check_number(self, name: str, low: float, high: float, allowed: str, low_open: bool = False) -> None:
        value = getattr(self, name)
        # NaN fails both comparisons, so it is refused with the rest; infinity fails the finiteness check.
        if (not _is_number(value) or not math.isfinite(value) or not low <= value <= high
                or (low_open and value == low)):
            raise _bad(name, value, allowed)

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def clone(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)
