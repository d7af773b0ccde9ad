"""InputProcessor: a user's request → validated engine Requests (vLLM's InputProcessor).

Tokenizes the prompt and any bad_words, checks every token id the request carries against the vocabulary and the
prompt against max_model_len, compiles any structured-output constraint (so a constraint the grammar engine can't
serve is refused here, before the first token), and makes one Request per sample. It touches no engine state, so the
caller's thread runs it: bad input raises InvalidArgument to the caller, and the engine loop never sees it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from serval.config import EngineConfig
from serval.engine.request import Request
from serval.openai.errors import InvalidArgument
from serval.sampling_params import SamplingParams, plain_token_ids

# What a prompt may be: text, token ids, or vLLM's dict forms {"prompt": ...} / {"prompt_token_ids": [...]}.
PromptType = str | list[int] | dict


@dataclass
class TokenizedPrompt:
    text: str | None  # None when the prompt came as token ids alone
    token_ids: list[int]
    cache_salt: str | None = None  # a dict prompt's "cache_salt" (serval.engine.request.Request.cache_salt)


@dataclass
class ProcessedInput:
    """A validated request: its prompt and one Request per sample."""
    prompt: TokenizedPrompt
    requests: list[Request]


class InputProcessor:
    def __init__(self, config: EngineConfig, tokenizer, vocab_size: int, eos_token_id: int | None,
                 device: torch.device) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.device = device
        self._grammar_compiler = None

    def process(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                priority: int = 0, arrival_time: float | None = None) -> ProcessedInput:
        """Raises InvalidArgument, naming the body field at fault, for anything the engine can't serve."""
        params = self.with_bad_words_tokenized(params or SamplingParams())
        tokenized = self.tokenize_prompt(prompt)
        self._validate_prompt(tokenized.token_ids, params)
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        grammars = ([self.grammar_compiler().new_state(params.structured_outputs) for _ in range(params.n)]
                    if params.structured_outputs is not None else [None] * params.n)
        requests = [Request(request_id=request_id if params.n == 1 else f"{index}_{request_id}",
                            prompt_token_ids=tokenized.token_ids, sampling_params=params,
                            eos_token_id=self.eos_token_id, max_model_len=self.config.max_model_len,
                            prompt=tokenized.text, priority=priority, arrival_time=arrival_time,
                            cache_salt=tokenized.cache_salt,
                            parent_request_id=request_id, index=index, grammar=grammars[index],
                            generator=(torch.Generator(device=self.device).manual_seed(params.seed + index)
                                       if params.seed is not None else None))
                    for index in range(params.n)]
        return ProcessedInput(tokenized, requests)

    def tokenize_prompt(self, prompt: PromptType) -> TokenizedPrompt:
        salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        if salt is not None and (not isinstance(salt, str) or not salt):
            raise InvalidArgument("cache_salt", f"invalid cache_salt {salt!r}: allowed a non-empty string")
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                token_ids = prompt["prompt_token_ids"]
                if not isinstance(token_ids, (list, tuple)):
                    raise InvalidArgument("prompt", f"invalid prompt_token_ids of type {type(token_ids).__name__}: "
                                                    "allowed a list of token ids")
                return TokenizedPrompt(prompt.get("prompt"), list(token_ids), salt)
            if "prompt" not in prompt:
                raise InvalidArgument("prompt", f"invalid prompt {prompt!r}: a dict needs 'prompt' or "
                                                "'prompt_token_ids'")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidArgument("prompt", "invalid prompt: this engine has no tokenizer, so prompts must be "
                                                "token ids")
            return TokenizedPrompt(prompt, self.tokenizer.encode(prompt), salt)
        if isinstance(prompt, list):
            return TokenizedPrompt(None, list(prompt), salt)
        raise InvalidArgument("prompt", f"invalid prompt of type {type(prompt).__name__}: allowed str, list of "
                                        "token ids, {'prompt': str} or {'prompt_token_ids': [...]}")

    def grammar_compiler(self):
        """serval.engine.structured_output.GrammarCompiler for this engine's tokenizer, made on first use
        (llguidance loads only when a request asks for structured output)."""
        if self._grammar_compiler is None:
            if self.tokenizer is None:
                raise InvalidArgument("structured_outputs", "invalid sampling parameter structured_outputs: "
                                                            "constrained decoding needs a tokenizer")
            from serval.engine.structured_output import GrammarCompiler
            self._grammar_compiler = GrammarCompiler(self.tokenizer)
        return self._grammar_compiler

    def prepare_sampling(self, params):
        """The work of process() that can take long, done ahead where a caller can afford it (the server, on its
        worker thread): the structured-output constraint compiled into the grammar cache, where process() finds
        it, and bad_words tokenized. Returns the params to pass on; raises InvalidArgument as process() would.
        Anything but SamplingParams (pooling) passes through."""
        if not isinstance(params, SamplingParams):
            return params
        if params.structured_outputs is not None:
            self.grammar_compiler().compile(params.structured_outputs)
        return self.with_bad_words_tokenized(params)

    def with_bad_words_tokenized(self, params: SamplingParams) -> SamplingParams:
        """params with bad_words tokenized into bad_words_token_ids: a copy, as the caller may reuse its params
        (LLM.generate gives one to every prompt); params whose words were tokenized already, as they are. Up to a
        second for a maximal list, so the server calls it off the event loop first (prepare_sampling)."""
        if not params.bad_words or params.bad_words_token_ids is not None:
            return params
        if self.tokenizer is None:
            raise InvalidArgument("bad_words", "invalid sampling parameter bad_words: bad words need a tokenizer; "
                                               "give bad_words_token_ids instead")
        return params.clone(bad_words_token_ids=bad_words_token_ids(self.tokenizer, params.bad_words))

    # ---- validation ----
    def _validate_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise InvalidArgument("prompt", "invalid prompt: it is empty; allowed: at least one token")
        self._check_token_ids(token_ids, params)
        limit = self.config.max_model_len
        if len(token_ids) >= limit:
            raise InvalidArgument("prompt", f"invalid prompt: it has {len(token_ids)} tokens, but max_model_len is "
                                            f"{limit}; allowed at most {limit - 1} prompt tokens so that one can be "
                                            "generated")
        if self.tokenizer is None and params.stop:
            raise InvalidArgument("stop", "invalid sampling parameter stop: stop strings need a tokenizer")

    def _check_token_ids(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Every token id the request carries must index the vocabulary: the sampler indexes the logits with
        them, and one out of range there fails the whole step."""
        vocab_size = self.vocab_size
        bad = _bad_token_ids(prompt_token_ids, vocab_size)
        if bad:
            raise InvalidArgument("prompt",
                                  f"invalid prompt token ids {bad[:5]}: allowed integers in [0, {vocab_size})")
        for param, token_ids in _sampling_token_ids(params):
            bad = _bad_token_ids(token_ids, vocab_size)
            if bad:
                raise InvalidArgument(param, f"invalid sampling parameter {param}={bad[:5]}: allowed token ids in "
                                             f"[0, {vocab_size})")


def _bad_token_ids(token_ids: list, vocab_size: int) -> list:
    """The ids that do not index the vocabulary. Run on the server's event loop (add_request): lists of plain ints
    are checked at C speed, the per-id look only names the bad ones."""
    if plain_token_ids(token_ids, vocab_size):
        return []
    return [t for t in token_ids if not _is_token_id(t, vocab_size)]


def _is_token_id(value, vocab_size: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size


def bad_words_token_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """The token sequences that spell each word (vLLM's SamplingParams.update_from_tokenizer): the word as given,
    its leading whitespace stripped (the word at the start of the text), and " " + that word (the word after a
    space, which byte-level BPE folds into the first token). The second is kept only where its first token differs
    (a SentencePiece tokenizer marks a word's start alike with or without the space) and it has as many tokens (the
    space folded in, not a token of its own). So a word whose spelling after a space is shorter, " Word" one token
    but "Word" several, is banned only where it starts the text: vLLM's rule, kept so the two engines agree."""
    sequences = []
    for word in words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        if not plain:
            raise InvalidArgument("bad_words", f"invalid sampling parameter bad_words: {word[:40]!r} has no tokens; "
                                               "allowed words the tokenizer spells with at least one token")
        sequences.append(plain)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            sequences.append(spaced)
    return sequences


def _sampling_token_ids(params: SamplingParams) -> list[tuple[str, list]]:
    """(OpenAI body field, token ids) for every token id the sampling parameters carry."""
    fields = [("stop_token_ids", params.stop_token_ids or []), ("logit_bias", list(params.logit_bias or ())),
              ("allowed_token_ids", params.allowed_token_ids or [])]
    if params.bad_words_token_ids:
        # Tokenized from bad_words, they are past the model's vocabulary only where the tokenizer's is larger.
        fields.append(("bad_words" if params.bad_words else "bad_words_token_ids",
                       [t for word in params.bad_words_token_ids for t in word]))
    return fields
