"""Structured output by constrained decoding: StructuredOutputsParams → llguidance grammar → per-request matcher,
and the token bitmask the sampler applies.

llguidance rather than xgrammar: it has no dependencies (xgrammar pulls in triton), installs offline as one
3 MB wheel, and takes JSON schema, regex, Lark and GBNF/EBNF grammars. Compiling a grammar against a
vocabulary is the expensive step (milliseconds for a schema; the tokenizer itself ~0.5 s), so the engine keeps a
GrammarCompiler: the LLTokenizer built once, and one compiled matcher per constraint, deep-copied per request.

A constraint can compile and still exceed llguidance's parser limits (ParserLimits: a choice of 10,000 strings makes
an Earley row of 10,001 items, over max_items_in_row; `a{1000}{1000}` runs the lexer out of fuel), and llguidance
reports that only when a token is consumed, by putting the matcher in an error state. So a new constraint is
probed when it is compiled: a few tokens are fed along one allowed path, and a limit hit there refuses the request
before its first token. A limit hit later, on another path, ends the request with an error (finish_reason
"error"), never with a "stop" whose text doesn't match. Errors carry no grammar (verbose_errors off) and logs name
a grammar by a short sha256, as grammars can be hundreds of kilobytes.

Filling a batch's masks takes milliseconds (llguidance's thread pool: ~10 ms for 256 rows of a tool grammar over
a 128k vocabulary), so it is kept off the step's critical path: the engine starts the fill on a worker thread
(start_mask_fill) as soon as each row's last token is known, before or while the forward runs, and the sampler
joins it (next_token_bitmask). The masks are the same as a fill at sampling time. With asynchronous scheduling the
tokens are handed to the same worker (start_mask_fill's fed), which feeds them to their matchers before it fills,
while the engine thread runs the output processor: feeding 256 tokens is ~1 ms of one core. What the output
processor reads of a fed grammar (accepted, stopped) waits for the feed, not for the fill.

Speculative decoding verifies a request's drafts d_1..d_k on k + 1 rows; row j (0..k) is masked with the
grammar's mask after d_1..d_j. llguidance fills those rows in one call per batch (the matcher advances through the
drafts and is rolled back after), on the same worker thread when the drafts are known before the forward
(draft_bitmasks). A draft the grammar rejects ends the rows that can be filled: the proposer cuts its drafts there
(num_valid), and a draft model's unchecked drafts are rejected at that row by the mask itself, so later rows are
never used.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import llguidance
import llguidance.hf
import numpy as np
import torch

from serval.engine.profiler import host_range
from serval.openai.errors import InvalidArgument
from serval.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# Compact JSON: no free whitespace between tokens. With flexible whitespace a weak (or random) model can emit
# whitespace forever; vLLM offers the same choice as disable_any_whitespace.
JSON_OPTIONS = {"whitespace_flexible": False}
GRAMMAR_CACHE_SIZE = 256
# Tokens fed along one allowed path when a constraint is first compiled. The limits found so far trip on the
# first token; a few more cost a few bitmasks (milliseconds), once per distinct constraint.
PROBE_TOKENS = 4
# The OpenAI body field a constraint came from. response_format's json_schema/json_object reach SamplingParams as
# the same StructuredOutputsParams as structured_outputs' json/json_object, so the field can't be told apart here.
PARAM = "structured_outputs"

def _limits() -> llguidance.LLParserLimits:
    # llguidance's default limits; verbose_errors off so that an error never carries the grammar or parser state.
    return llguidance.LLParserLimits(verbose_errors=False)


def grammar_digest(grammar: str) -> str:
    """What logs call a grammar: the first 16 hex digits of its sha256."""
    return hashlib.sha256(grammar.encode()).hexdigest()[:16]


@dataclass(eq=False)
class GrammarState:
    """One request's position in its grammar (lives on Request.grammar).

    The output processor advances it per accepted token. With asynchronous scheduling the token is fed earlier,
    right after it reaches the host, by the fill worker (start_mask_fill's fed), which then fills the next mask
    while the host processes the step; advance() then reports that result instead of consuming the token twice,
    and accepted and stopped wait for the feed. While a worker feeds or fills the matcher, nothing else may touch
    it (llguidance borrows it): every matcher call here waits for the state's feed and pending fill first.
    """
    matcher: llguidance.LLMatcher
    vocab_size: int  # the tokenizer's: the bitmask's width in bits
    digest: str = ""  # grammar_digest of its grammar, for logs
    num_consumed: int = 0  # tokens fed to the matcher
    num_reported: int = 0  # tokens the output processor advanced through: num_consumed, or one fewer after consume()
    last_token_id: int | None = None
    pending: PendingMask | None = None  # this state's row of a fill started for it, until the sampler takes it
    feed: MaskFill | None = None  # the fill whose worker feeds last_token_id, until its results are read
    _accepted: bool = True  # the matcher took the last token
    _stopped: bool = False  # after the last token, nothing but end-of-sequence may follow

    # Read per token on the engine thread (the output processor): the call to wait is made only while a feed is out.
    @property
    def accepted(self) -> bool:
        if self.feed is not None:
            self._wait_for_feed()
        return self._accepted

    @property
    def stopped(self) -> bool:
        if self.feed is not None:
            self._wait_for_feed()
        return self._stopped

    @property
    def error(self) -> str:
        """llguidance's error, first lines only; empty while the matcher is fine."""
        self.wait_for_fill()
        return _first_line(self.matcher.get_error()) if self.matcher.is_error() else ""

    def consume(self, token_id: int) -> None:
        """Feed a sampled token to the matcher ahead of advance(), which reports the result."""
        self._check_feedable(token_id)
        self._fed(token_id, self.matcher.consume_token(token_id))

    def _check_feedable(self, token_id: int) -> None:
        if self.num_consumed != self.num_reported:
            raise RuntimeError(f"grammar {self.digest}: token {token_id} fed before token {self.last_token_id} was "
                               "reported")
        self.wait_for_fill()

    def _fed(self, token_id: int, accepted: bool) -> None:
        self._took(accepted)
        self.last_token_id = token_id
        self.num_consumed += 1

    def _took(self, accepted: bool) -> None:
        """What the matcher said of the token just fed: here by consume(), on the fill worker by _feed."""
        self._accepted = accepted
        self._stopped = self.matcher.is_stopped()

    def _hand_off(self, token_id: int, fill: MaskFill) -> None:
        """token_id goes to `fill`'s worker, which feeds it (_feed) and records what consume() would."""
        self._check_feedable(token_id)
        self.last_token_id = token_id
        self.num_consumed += 1
        self.feed = fill

    def _wait_for_feed(self) -> None:
        if self.feed is not None:
            self.feed.wait_fed()
            self.feed = None

    def advance(self, token_id: int) -> bool:
        """Consume an accepted token (unless consume() fed it already); False if the grammar rejected it (the
        matcher is then in error)."""
        if self.num_reported == self.num_consumed:
            self.consume(token_id)
        elif token_id != self.last_token_id:
            raise RuntimeError(f"grammar {self.digest}: token {self.last_token_id} was fed ahead, but the output "
                               f"has {token_id}")
        elif self.feed is not None:
            self._wait_for_feed()
        self.num_reported += 1
        return self._accepted

    terminated = stopped  # nothing but end-of-sequence may follow: the output is complete (the output processor's word)

    def num_valid(self, token_ids: list[int]) -> int:
        """How many of token_ids, from the first, the grammar would take after the tokens consumed so far (the
        matcher is left where it is)."""
        self.wait_for_fill()
        return self.matcher.validate_tokens(token_ids)

    def wait_for_fill(self) -> None:
        """Until no worker uses the matcher: its last token fed, the fill started for it done."""
        self._wait_for_feed()
        if self.pending is not None:
            self.pending.fill.wait()


@dataclass(eq=False)
class MaskFill:
    """The next-token bitmasks of a batch of grammar states, filled on the fill worker thread, after it has fed
    the tokens handed to it. llguidance's feed and fill release the GIL, so they run while the device computes the
    logits and the host processes the last tokens."""
    bitmask: torch.Tensor  # int32 [rows, words], pinned when it goes to a GPU
    states: list[GrammarState] = field(default_factory=list)  # in row order, one row each when nothing drafts
    done: threading.Event = field(default_factory=threading.Event)
    fed: threading.Event = field(default_factory=threading.Event)  # the handed tokens are in their matchers
    error: BaseException | None = None

    def wait(self) -> torch.Tensor:
        if not self.done.is_set():
            self.done.wait()
        self._raise_error()
        return self.bitmask

    def wait_fed(self) -> None:
        if not self.fed.is_set():
            self.fed.wait()
        self._raise_error()

    def _raise_error(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"grammar mask fill failed: {self.error}") from self.error


class _FillWorker:
    """One long-lived daemon thread that runs the mask fills in the order they were started. A thread started per
    step cost two GIL hand-offs before the step could go on (Thread.start waits for the new thread to run), each up
    to the interpreter's switch interval while the server's event loop holds the GIL."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="serval-grammar-fill", daemon=True).start()

    def submit(self, fill: MaskFill, fed: list[tuple[GrammarState, int]],
               matchers: list[tuple[llguidance.LLMatcher, int, list[int]]]) -> None:
        """fed: (state, token) to feed first. matchers: (matcher, its first row, the drafts whose rows follow), as
        _fill_rows_into takes them."""
        self._queue.put((fill, fed, matchers))

    def _run(self) -> None:
        while True:
            fill, fed, matchers = self._queue.get()
            try:
                if fed:
                    with host_range("serval.grammar_feed"):
                        _feed(fed)
                fill.fed.set()
                with host_range("serval.grammar_fill"):
                    if any(drafts for _, _, drafts in matchers):
                        fill.bitmask.fill_(-1)  # rows after a rejected draft are left unwritten: all allowed
                    _fill_rows_into(matchers, fill.bitmask)
            except BaseException as error:  # handed to the thread that waits: it must fail its step, not vanish
                fill.error = error
            finally:
                fill.fed.set()
                fill.done.set()


def _feed(fed: list[tuple[GrammarState, int]]) -> None:
    """Each state's token into its matcher, and what GrammarState.consume records. One call with the GIL released,
    on a one-thread pool of its own: the feed is serial work (~4 us a token) off the engine thread already, and
    the fill's pool stays idle between fills (its 12 threads on the H200 host spinning through the host's step
    was the suspect of the +33.5% run, docs/performance.md)."""
    accepted = _ll_feed_executor().consume_token_par([(state.matcher, token_id) for state, token_id in fed])
    for (state, _), took in zip(fed, accepted):
        state._took(took)


@functools.cache
def _fill_worker() -> _FillWorker:
    return _FillWorker()


@dataclass(eq=False, slots=True)
class PendingMask:
    """A state's rows of a MaskFill, valid while the state is still where the fill started: row, then one row after
    each of draft_token_ids (speculative decoding's verify rows)."""
    fill: MaskFill
    row: int
    num_consumed: int
    draft_token_ids: tuple[int, ...] = ()

    def matches(self, state: GrammarState, draft_token_ids: list[int]) -> bool:
        return self.num_consumed == state.num_consumed and self.draft_token_ids == tuple(draft_token_ids)


def grammar_spec(params: StructuredOutputsParams) -> tuple[str, str]:
    """(kind, llguidance grammar text). Raises InvalidArgument for a malformed constraint."""
    kind = params.kind
    if kind == "json":
        schema = params.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as error:
                raise InvalidArgument(PARAM, "invalid sampling parameter structured_outputs.json: not valid JSON "
                                             f"({error})")
        if not isinstance(schema, dict):
            raise InvalidArgument(PARAM, "invalid sampling parameter structured_outputs.json: allowed a JSON schema "
                                         f"object, got {type(schema).__name__}")
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
        raise InvalidArgument(PARAM, f"invalid sampling parameter structured_outputs.grammar: {error}") from error


class GrammarCompiler:
    """Compiles constraints against one tokenizer's vocabulary, with an LRU cache of compiled matchers. The
    engine owns one; the server's threads may use it concurrently (tokenizing and validating happen there)."""

    def __init__(self, tokenizer, cache_size: int = GRAMMAR_CACHE_SIZE) -> None:
        self.tokenizer = tokenizer
        self.cache_size = cache_size
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        # (kind, sha256 of the grammar) -> the prototype matcher, or the message of the refusal.
        self._compiled: OrderedDict[tuple[str, str], llguidance.LLMatcher | str] = OrderedDict()
        self._compiling: dict[tuple[str, str], threading.Event] = {}  # keys being compiled now
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """The llguidance view of the HF fast tokenizer (from tokenizer.json or rebuilt from a GGUF), built once."""
        if self._ll_tokenizer is None:
            built = _ll_tokenizer_of(self.tokenizer)
            with self._lock:
                if self._ll_tokenizer is None:
                    self._ll_tokenizer = built
        return self._ll_tokenizer

    def new_state(self, params: StructuredOutputsParams) -> GrammarState:
        kind, grammar = grammar_spec(params)
        return GrammarState(self._matcher(kind, grammar), self.ll_tokenizer.vocab_size, grammar_digest(grammar))

    def compile(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        return self._matcher(*grammar_spec(params))

    def _matcher(self, kind: str, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher for one request. Raises InvalidArgument ('invalid sampling parameter
        structured_outputs.<kind>: ...') when the constraint does not compile or exceeds the parser's limits;
        repeats (refusals too) cost a dictionary lookup and, when accepted, a deep copy."""
        key = (kind, hashlib.sha256(grammar.encode()).hexdigest())  # grammars can be 100s of KB: keep their hash
        while True:
            with self._lock:
                compiled = self._compiled.get(key)
                if compiled is not None:
                    self._compiled.move_to_end(key)
                    self.hits += 1
                    break
                pending = self._compiling.get(key)
                if pending is None:  # this thread compiles; others asking meanwhile wait for it
                    pending = self._compiling[key] = threading.Event()
                    break
            # A burst of requests with the same new grammar (tool calls: every request carries the same tools)
            # compiles it once, not once per request.
            pending.wait()
        if compiled is None:
            try:
                compiled = self._compile_new(kind, grammar)
                with self._lock:
                    self.misses += 1
                    self._compiled[key] = compiled
                    while len(self._compiled) > self.cache_size:
                        self._compiled.popitem(last=False)
            finally:
                with self._lock:
                    self._compiling.pop(key).set()
        if isinstance(compiled, str):
            raise InvalidArgument(PARAM, compiled)
        return compiled.deep_copy()

    def _compile_new(self, kind: str, grammar: str) -> llguidance.LLMatcher | str:
        """The prototype matcher, or the refusal's message."""
        prototype = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0, limits=_limits())
        if prototype.is_error():
            return f"invalid sampling parameter structured_outputs.{kind}: {_first_line(prototype.get_error())}"
        error = probe(prototype, self.ll_tokenizer.vocab_size, self.ll_tokenizer.eos_token)
        if error:
            logger.warning("structured output constraint exceeds the grammar engine's limits",
                           extra={"grammar_sha256": grammar_digest(grammar), "kind": kind, "error": error})
            return (f"invalid sampling parameter structured_outputs.{kind}: the constraint is too complex for the "
                    f"grammar engine ({error})")
        return prototype


def probe(prototype: llguidance.LLMatcher, vocab_size: int, eos_token_id: int) -> str:
    """Feed a copy of the matcher up to PROBE_TOKENS tokens along one allowed path (the lowest allowed id that
    isn't EOS at each step); llguidance's error if it hits one, else ""."""
    matcher = prototype.deep_copy()
    for _ in range(PROBE_TOKENS):
        if matcher.is_stopped():
            return ""
        allowed = allowed_mask(fill_bitmask([matcher], vocab_size), vocab_size)[0]
        if matcher.is_error():
            return _first_line(matcher.get_error())
        allowed[eos_token_id] = False
        candidates = allowed.nonzero()
        if not len(candidates):
            return ""  # only the end may follow
        if not matcher.consume_token(int(candidates[0])):
            return _first_line(matcher.get_error())
    return ""


def fill_bitmask(matchers: list[llguidance.LLMatcher], vocab_size: int, pin_memory: bool = False) -> torch.Tensor:
    """int32 [len(matchers), ceil(vocab/32)]: bit j of word w allows token 32*w + j. Matchers run in parallel."""
    words = (vocab_size + 31) // 32
    bitmask = torch.full((len(matchers), words), -1, dtype=torch.int32, pin_memory=pin_memory)
    _fill_into(matchers, bitmask)
    return bitmask


def _fill_into(matchers: list[llguidance.LLMatcher], bitmask: torch.Tensor) -> None:
    # What llguidance.torch.fill_next_token_bitmask_par does, without importing its torch.compile'd helpers.
    if matchers:
        _ll_executor().unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                               bitmask.shape[1] * 4, bitmask.shape[0])


@functools.cache
def _ll_executor() -> llguidance.LLExecutor:
    """llguidance's thread pool for filling bitmasks: process-wide, like torch's intra-op pool, and stateless."""
    return llguidance.LLExecutor(num_threads=_num_executor_threads())


@functools.cache
def _ll_feed_executor() -> llguidance.LLExecutor:
    return llguidance.LLExecutor(num_threads=1)


@functools.cache
def _num_executor_threads() -> int:
    # llguidance's own default, spelled out so that the benchmarks can say how many threads fill.
    return max(1, min(32, int(0.8 * len(os.sched_getaffinity(0)))))


def start_mask_fill(states: list[GrammarState], pin_memory: bool = False,
                    draft_token_ids: list[list[int]] | None = None, fed: list[GrammarState] = (),
                    fed_token_ids: list[int] = ()) -> MaskFill | None:
    """Start filling the next-token masks of `states` on a worker thread; the sampler takes each row
    (next_token_bitmask) or, if the state moved on since, fills it again. Each state has its last token in its
    matcher, or is one of `fed`: states whose sampled token (fed_token_ids) the worker feeds first, so that the
    caller goes on meanwhile (their accepted and stopped wait for the feed). Stopped matchers are left out, their
    requests end; a fed one is filled (with end-of-sequence alone) as its stop is not known yet.
    pin_memory: the masks go to a GPU (copied without a wait). draft_token_ids: per state, the speculative drafts
    its request verifies: their rows are filled too (draft_bitmasks takes them)."""
    drafts_of = draft_token_ids if draft_token_ids is not None else [[] for _ in states]
    fed_ids = {id(state) for state in fed}
    kept = [(state, list(drafts)) for state, drafts in zip(states, drafts_of)
            if id(state) in fed_ids or not state.stopped]
    if not kept and not fed:
        return None
    for state, _ in kept:
        state.wait_for_fill()  # an older fill still reading a matcher: llguidance allows one borrower at a time
    words = (max(state.vocab_size for state, _ in kept) + 31) // 32 if kept else 0
    # llguidance writes every row it is given a matcher for (the fill worker blanks the rest where drafts leave
    # some), so the engine thread allocates without writing: a blank 4 MB for 256 rows of a 128k vocabulary cost it
    # a memset, and page faults where the memory is not pinned, every step.
    fill = MaskFill(torch.empty((sum(len(drafts) + 1 for _, drafts in kept), words), dtype=torch.int32,
                                pin_memory=pin_memory), [state for state, _ in kept])
    for state, token_id in zip(fed, fed_token_ids):
        state._hand_off(token_id, fill)
    rows = _first_rows([drafts for _, drafts in kept])
    for (state, drafts), row in zip(kept, rows):
        state.pending = PendingMask(fill, row, state.num_consumed, tuple(drafts))
    _fill_worker().submit(fill, list(zip(fed, fed_token_ids)),
                          [(state.matcher, row, drafts) for (state, drafts), row in zip(kept, rows)])
    return fill


def _first_rows(draft_token_ids: list[list[int]]) -> list[int]:
    """Each state's first row when state i has 1 + len(draft_token_ids[i]) consecutive rows."""
    rows, row = [], 0
    for drafts in draft_token_ids:
        rows.append(row)
        row += len(drafts) + 1
    return rows


def _fill_rows_into(matchers: list[tuple[llguidance.LLMatcher, int, list[int]]], bitmask: torch.Tensor) -> None:
    """Fill each (matcher, first row, drafts)'s rows: the mask now, then after each draft. llguidance advances the
    matcher through the drafts and rolls it back; rows after a draft it rejects are left as they were."""
    without_drafts = [(matcher, row) for matcher, row, drafts in matchers if not drafts]
    with_drafts = [(matcher, row, drafts) for matcher, row, drafts in matchers if drafts]  # llguidance wants some
    if without_drafts:
        _ll_executor().unsafe_compute_mask_ptr(without_drafts, bitmask.data_ptr(), bitmask.shape[1] * 4,
                                               bitmask.shape[0])
    if with_drafts:
        _ll_executor().unsafe_compute_mask_ptr_with_draft_token(with_drafts, bitmask.data_ptr(), bitmask.shape[1] * 4,
                                                                bitmask.shape[0])


def next_token_bitmask(states: list[GrammarState], pin_memory: bool = False) -> torch.Tensor:
    """int32 [len(states), words]: each state's next-token mask. Rows of a fill started for the state where it
    still is are taken from that fill (waiting for it); the others are filled now. Equal to fill_bitmask of the
    states' matchers either way."""
    whole = _whole_fill(states)
    if whole is not None:  # the usual case: the fill was started for exactly these states
        for state in states:
            state.pending = None
        return whole.wait()
    current = [state.pending if state.pending is not None and state.pending.matches(state, []) else None
               for state in states]
    fills = {id(pending.fill): pending.fill for pending in current if pending is not None}
    for state in states:
        state.wait_for_fill()
        state.pending = None
    if len(fills) == 1 and all(pending is not None for pending in current):
        (fill,) = fills.values()
        # Some stopped after the fill started (a stop string, EOS): their rows are left out. (All of them in
        # order is _whole_fill's case, taken above.)
        rows = [pending.row for pending in current]
        bitmask = torch.empty((len(rows), fill.bitmask.shape[1]), dtype=torch.int32, pin_memory=pin_memory)
        return torch.index_select(fill.wait(), 0, torch.tensor(rows), out=bitmask)
    words = (max(state.vocab_size for state in states) + 31) // 32
    bitmask = torch.full((len(states), words), -1, dtype=torch.int32, pin_memory=pin_memory)
    for fill in fills.values():
        fill.wait()
    taken = [i for i, pending in enumerate(current) if pending is not None]
    for i in taken:
        bitmask[i] = current[i].fill.bitmask[current[i].row]
    missing = [i for i, pending in enumerate(current) if pending is None]
    if missing:
        bitmask[missing] = fill_bitmask([states[i].matcher for i in missing], bitmask.shape[1] * 32)
    return bitmask


def _whole_fill(states: list[GrammarState]) -> MaskFill | None:
    """The fill started for exactly `states`, in this order, none of them drafting or moved on since; else None.
    One pass: next_token_bitmask runs on the engine thread every constrained step."""
    first = states[0].pending if states else None
    if first is None or len(first.fill.states) != len(states):
        return None
    fill = first.fill
    for state, filled in zip(states, fill.states):
        pending = state.pending
        if (state is not filled or pending is None or pending.fill is not fill or pending.draft_token_ids
                or pending.num_consumed != state.num_consumed):
            return None
    return fill


def draft_bitmasks(states: list[GrammarState], draft_token_ids: list[list[int]],
                   pin_memory: bool = False) -> torch.Tensor:
    """int32 [sum(len(drafts) + 1), words]: state i's rows, consecutive: its mask now, then after each of its drafts
    (speculative verification). Rows after a draft the grammar rejects allow everything (that draft's own row
    rejects it, so they are never sampled from). Taken from a fill started for the same state and drafts where
    there is one, else filled now; every matcher is left where it was."""
    words = (max(state.vocab_size for state in states) + 31) // 32
    rows = _first_rows(draft_token_ids)
    bitmask = torch.full((rows[-1] + len(draft_token_ids[-1]) + 1, words), -1, dtype=torch.int32,
                         pin_memory=pin_memory)
    missing = []
    for state, drafts, row in zip(states, draft_token_ids, rows):
        pending = state.pending
        state.wait_for_fill()
        state.pending = None
        if pending is not None and pending.matches(state, drafts):
            bitmask[row:row + len(drafts) + 1] = pending.fill.wait()[pending.row:pending.row + len(drafts) + 1]
        else:
            missing.append((state.matcher, row, list(drafts)))
    _fill_rows_into(missing, bitmask)
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


def disallowed_mask_on(bitmask: torch.Tensor, vocab_size: int, device: torch.device) -> torch.Tensor:
    """disallowed_mask, on `device`. On a GPU the int32 words go over (4 bytes per 32 tokens: 4 MB for 256 rows of
    a 128k vocabulary, where the unpacked mask is 32 MB) and are unpacked there, which also spares the host the
    unpack pass of every constrained step."""
    if device.type != "cuda":
        return disallowed_mask(bitmask, vocab_size)
    # From pinned memory the copy is queued behind the step's kernels; a pageable one would wait for them.
    return unpack_disallowed(bitmask.to(device, non_blocking=bitmask.is_pinned()), vocab_size)


def unpack_disallowed(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """disallowed_mask in torch ops, on the bitmask's own device."""
    bits = (bitmask.unsqueeze(-1) & _bit_values(bitmask.device)).view(bitmask.shape[0], -1) == 0
    if bits.shape[1] >= vocab_size:
        return bits[:, :vocab_size]
    return torch.nn.functional.pad(bits, (0, vocab_size - bits.shape[1]), value=True)


def _ll_tokenizer_of(tokenizer) -> llguidance.LLTokenizer:
    """llguidance.hf.from_tokenizer without its copy of the Rust tokenizer (seconds for a 128k vocabulary, under
    the GIL: every stream of a running server stalls meanwhile), where nothing needs resetting on the copy."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.padding is not None or backend.truncation is not None:
        return llguidance.hf.from_tokenizer(tokenizer)
    return llguidance.LLTokenizer(backend.to_str(), eos_token=tokenizer.eos_token_id)


@functools.cache
def _bit_values(device: torch.device) -> torch.Tensor:
    """int32 [32]: 1 << j (bit 31 as the negative int32 it is), made once per device: every torch call on the
    engine thread can wait a switch interval for the GIL while the server's event loop runs."""
    return torch.tensor([1 << j if j < 31 else -(1 << 31) for j in range(32)], dtype=torch.int32, device=device)


def _first_line(message: str) -> str:
    """The message's first lines, joined, at most 300 characters: llguidance's errors can quote a whole grammar."""
    lines = [line.strip() for line in message.strip().splitlines()[:3] if line.strip() != "<non-verbose/>"]
    return " ".join(lines)[:300]
