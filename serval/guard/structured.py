"""Structured output by constrained decoding: StructuredOutputsParams → llguidance grammar → per-request matcher,
and the token bitmask the sampler applies.

llguidance rather than xgrammar: it has no dependencies (xgrammar pulls in triton), installs offline as one
3 MB wheel, and takes JSON schema, regex, Lark and GBNF/EBNF grammars. Compiling a grammar against a
vocabulary is the expensive step (milliseconds for a schema; the tokenizer itself ~0.5 s), so the engine keeps a
GrammarCompiler: the LLTokenizer built once, and one compiled matcher per constraint, deep-copied per request.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import llguidance
import llguidance.hf
import numpy as np
import torch

from serval.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# Compact JSON: no free whitespace between tokens. With flexible whitespace a weak (or random) model can emit
# whitespace forever; vLLM offers the same choice as disable_any_whitespace.
JSON_OPTIONS = {"whitespace_flexible": False}
GRAMMAR_CACHE_SIZE = 256

# llguidance's thread pool for filling bitmasks: process-wide, like torch's intra-op pool, and stateless.
_executor: llguidance.LLExecutor | None = None


@dataclass(eq=False)
class GrammarState:
    """One request's position in its grammar (lives on Request.grammar; advanced by the engine per token)."""
    matcher: llguidance.LLMatcher
    vocab_size: int  # the tokenizer's: the bitmask's width in bits

    def advance(self, token_id: int) -> bool:
        """Consume an accepted token; False if the grammar rejected it (the matcher is then in error)."""
        return self.matcher.consume_token(token_id)

    @property
    def terminated(self) -> bool:
        """Nothing but end-of-sequence may follow: the output is complete."""
        return self.matcher.is_stopped()


def grammar_spec(params: StructuredOutputsParams) -> tuple[str, str]:
    """(kind, llguidance grammar text). Raises ValueError naming the field for a malformed constraint."""
    kind = params.kind
    if kind == "json":
        schema = params.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as error:
                raise ValueError(f"invalid sampling parameter structured_outputs.json: not valid JSON ({error})")
        if not isinstance(schema, dict):
            raise ValueError("invalid sampling parameter structured_outputs.json: allowed a JSON schema object, "
                             f"got {type(schema).__name__}")
        return kind, llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    if kind == "json_object":
        return kind, llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if kind == "regex":
        return kind, llguidance.LLMatcher.grammar_from_regex(params.regex)
    if kind == "choice":
        return kind, llguidance.grammar_from("choice", list(params.choice))
    try:
        return kind, llguidance.grammar_from("ebnf", params.grammar)
    except ValueError as error:
        raise ValueError(f"invalid sampling parameter structured_outputs.grammar: {error}") from error


class GrammarCompiler:
    """Compiles constraints against one tokenizer's vocabulary, with an LRU cache of compiled matchers. The
    engine owns one; the server's threads may use it concurrently (tokenizing and validating happen there)."""

    def __init__(self, tokenizer, cache_size: int = GRAMMAR_CACHE_SIZE) -> None:
        self.tokenizer = tokenizer
        self.cache_size = cache_size
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """The llguidance view of the HF fast tokenizer (from tokenizer.json or rebuilt from a GGUF), built once."""
        if self._ll_tokenizer is None:
            built = llguidance.hf.from_tokenizer(self.tokenizer)
            with self._lock:
                if self._ll_tokenizer is None:
                    self._ll_tokenizer = built
        return self._ll_tokenizer

    def new_state(self, params: StructuredOutputsParams) -> GrammarState:
        return GrammarState(self.compile(params), self.ll_tokenizer.vocab_size)

    def compile(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        """A fresh matcher for one request. Raises ValueError ('invalid sampling parameter
        structured_outputs.<kind>: ...') when the constraint does not compile; repeats cost a deep copy."""
        kind, grammar = grammar_spec(params)
        key = (kind, grammar)
        with self._lock:
            prototype = self._compiled.get(key)
            if prototype is not None:
                self._compiled.move_to_end(key)
                self.hits += 1
                return prototype.deep_copy()
        prototype = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if prototype.is_error():
            raise ValueError(f"invalid sampling parameter structured_outputs.{kind}: "
                             f"{_first_line(prototype.get_error())}")
        with self._lock:
            self.misses += 1
            self._compiled[key] = prototype
            while len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        return prototype.deep_copy()


def fill_bitmask(matchers: list[llguidance.LLMatcher], vocab_size: int) -> torch.Tensor:
    """int32 [len(matchers), ceil(vocab/32)]: bit j of word w allows token 32*w + j. Matchers run in parallel."""
    global _executor
    if _executor is None:
        _executor = llguidance.LLExecutor()
    words = (vocab_size + 31) // 32
    bitmask = torch.full((len(matchers), words), -1, dtype=torch.int32)
    _executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(), words * 4,
                                      len(matchers))
    return bitmask


def allowed_mask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [B, vocab_size] from an int32 bitmask; tokens past the tokenizer's vocabulary (padding rows of
    the embedding) are never allowed."""
    return ~disallowed_mask(bitmask, vocab_size)


def disallowed_mask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [B, vocab_size], True where the token is not allowed: what masked_fill wants, in one unpack (numpy's
    unpackbits is one pass over the bytes; shifting int32 words by 0..31 in torch makes 32 passes)."""
    inverted = (~bitmask).contiguous().numpy().view(np.uint8)  # little-endian words: bit j of byte k = token 8k+j
    # unpackbits gives 0/1 bytes, which is torch.bool's representation: a view, no conversion pass.
    bits = torch.from_numpy(np.unpackbits(inverted, axis=1, bitorder="little")).view(torch.bool)
    if bits.shape[1] >= vocab_size:
        return bits[:, :vocab_size]
    return torch.nn.functional.pad(bits, (0, vocab_size - bits.shape[1]), value=True)


def _first_line(message: str) -> str:
    return " ".join(line.strip() for line in message.strip().splitlines()[:3])
