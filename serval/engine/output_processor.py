"""OutputProcessor: what the model sampled → what the user sees (vLLM v1's output processor).

The engine core emits token ids; this module owns everything after: appending them to their requests, stop checks
(EOS and stop token ids, stop strings, a completed or failed grammar, the length limits), detokenization, logprobs
with their decoded tokens, and building each request's cumulative RequestOutput, or in the engine-core process
its OutputDelta (what is new since the last one sent, a plain tuple: make_deltas). It keeps the frontend state of
every live request (RequestState, one SequenceState per sample) so that Request holds engine state only.

A step is processed in two calls, because a finished sequence's output carries the time the scheduler finished it:
process_step() decides which sequences finish and with what status, the engine finishes them in the scheduler,
then make_outputs() builds the outputs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from serval.engine.detokenizer import IncrementalDetokenizer, find_stop_string, stop_holdback
from serval.engine.request import Request, RequestStatus
from serval.engine.spec_decode.decoder import acceptance_length
from serval.openai.errors import InvalidArgument
from serval.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestMetrics, RequestOutput, SampleLogprobs

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class SequenceState:
    """One sample's frontend state: its text so far and the rest of its CompletionOutput."""
    request: Request
    detokenizer: IncrementalDetokenizer | None
    text: str = ""
    logprobs: SampleLogprobs | None = None
    cumulative_logprob: float = 0.0
    stop_reason: int | str | None = None
    # Set by process_step when the sequence is to finish; the engine then finishes it in the scheduler.
    status: RequestStatus | None = None
    # What the engine-core process has sent of it (make_deltas): the text as sent, and counts of the rest.
    sent_text: str = ""
    num_sent_token_ids: int = 0
    num_sent_logprobs: int = 0


@dataclass(eq=False)
class RequestState:
    """One user request as the engine accepted it: one prompt, n samples (each its own Request)."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[SequenceState]
    prompt_logprobs: PromptLogprobs | None = None
    # False: reported only once every sample has finished (vLLM's FINAL_ONLY output kind). Offline generation
    # needs nothing else, and building a RequestOutput for every running request every step is host time the
    # GPU waits for.
    stream: bool = True
    sent_prompt: bool = False  # make_deltas sent the prompt (its first delta)

    @property
    def requests(self) -> list[Request]:
        return [sequence.request for sequence in self.sequences]

    @property
    def finished(self) -> bool:
        # A loop, not all() over a generator: read for every reported request every step.
        for sequence in self.sequences:
            if sequence.status is None:
                return False
        return True


@dataclass
class StepUpdate:
    """What a step changed: the sequences to finish (their status set) and the requests to report."""
    finished: list[SequenceState] = field(default_factory=list)
    to_report: list[RequestState] = field(default_factory=list)


@dataclass
class SampledToken:
    """One request's result from a step: its new token (None mid-prompt), and the logprobs asked for."""
    token_id: int | None
    logprobs: dict[int, Logprob] | None
    prompt_logprobs: list[dict[int, Logprob]] | None


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.request_states: dict[str, RequestState] = {}
        self.num_generation_tokens = 0

    def new_request_state(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                          requests: list[Request]) -> RequestState:
        """The frontend state of a request being admitted. Touches nothing shared: a frontend thread may call it
        (starting a detokenizer decodes the end of the prompt)."""
        sequences = []
        for request in requests:
            params = request.sampling_params
            detokenizer = (IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens,
                                                  params.spaces_between_special_tokens)
                           if self.tokenizer is not None and params.detokenize else None)
            sequences.append(SequenceState(request, detokenizer, logprobs=[] if params.logprobs is not None else None))
        first = requests[0].sampling_params
        return RequestState(request_id, prompt, prompt_token_ids, sequences,
                            prompt_logprobs=[None] if first.prompt_logprobs is not None else None)

    def add_request(self, state: RequestState) -> None:
        if state.request_id in self.request_states:
            raise InvalidArgument(None, f"invalid request_id {state.request_id!r}: a request with this id is "
                                        "already running")
        self.request_states[state.request_id] = state

    def remove_request(self, request_id: str) -> RequestState | None:
        return self.request_states.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.request_states)

    def process_step(self, requests: list[Request], sampled: list[SampledToken], now: float) -> StepUpdate:
        """Append each request's new token and check its stops. Requests already finished (aborted, or stopped
        on the previous step's token under asynchronous scheduling) are skipped."""
        update = StepUpdate()
        appended: list[tuple[RequestState, SequenceState, RequestStatus | GrammarCheck | None]] = []
        for request, result in zip(requests, sampled):
            state = self.request_states.get(request.parent_request_id)
            if state is None or request.is_finished:
                continue
            if result.prompt_logprobs is not None:
                request.num_prompt_logprobs_computed += len(result.prompt_logprobs)
                if request.index == 0:  # every sample computes them; the output has one copy
                    state.prompt_logprobs.extend(self._decoded(entry) for entry in result.prompt_logprobs)
            if result.token_id is None:
                continue
            sequence = state.sequences[request.index]
            # max_tokens 0 scores the prompt: its logprobs are the answer, and the token sampled after it is not.
            if request.sampling_params.max_tokens == 0:
                appended.append((state, sequence, RequestStatus.FINISHED_LENGTH))
            else:
                appended.append((state, sequence, self._append_token(sequence, result.token_id, result.logprobs,
                                                                     now)))
        # The grammars' statuses come last: with asynchronous scheduling a worker thread is still feeding them
        # their tokens (structured_output.start_mask_fill) while the rest of the step is processed. Every status
        # is known before any is set, so that a feed that failed leaves none set: the step's requests all end
        # with an error (LLMEngine._fail_step), none finished here and never in the scheduler.
        statuses = [_grammar_checked(sequence, found) if type(found) is tuple else found
                    for _, sequence, found in appended]
        to_report: dict[str, RequestState] = {}
        for (state, sequence, _), status in zip(appended, statuses):
            sequence.status = status
            if status is not None:
                update.finished.append(sequence)
            if state.stream or status is not None:
                to_report[state.request_id] = state
        update.to_report = [state for state in to_report.values() if state.stream or state.finished]
        return update

    def process_more_tokens(self, requests: list[Request], token_ids: list[list[int]],
                            logprobs: list[list[dict[int, Logprob]] | None], now: float, update: StepUpdate) -> None:
        """Append each request's further tokens of the step (a verify step's after its first, which process_step
        took) one at a time, so a stop on one drops the rest as it would have without speculation; `update`, the
        step's, takes the sequences that finish and the requests to report."""
        reported = {id(state) for state in update.to_report}
        for request, tokens, entries in zip(requests, token_ids, logprobs):
            state = self.request_states.get(request.parent_request_id)
            if state is None or request.is_finished:
                continue
            sequence = state.sequences[request.index]
            for j, token_id in enumerate(tokens):
                if sequence.status is not None:
                    break
                found = self._append_token(sequence, token_id, entries[j] if entries is not None else None, now)
                sequence.status = _grammar_checked(sequence, found) if type(found) is tuple else found
                if sequence.status is not None:
                    update.finished.append(sequence)
            if (state.stream or state.finished) and id(state) not in reported:
                reported.add(id(state))
                update.to_report.append(state)

    def fail_requests(self, request_ids: list[str]) -> StepUpdate:
        """End these requests' unfinished sequences with an error (a step that held them raised)."""
        update = StepUpdate()
        for request_id in request_ids:
            state = self.request_states.get(request_id)
            if state is None:
                continue
            for sequence in state.sequences:
                if sequence.status is None:
                    sequence.status = RequestStatus.FINISHED_ERROR
                    update.finished.append(sequence)
            update.to_report.append(state)
        return update

    def make_outputs(self, states: list[RequestState]) -> list[RequestOutput]:
        """Each state's cumulative RequestOutput; finished requests are forgotten."""
        outputs = [_request_output(state) for state in states]
        self._forget_finished(states)
        return outputs

    def make_deltas(self, states: list[RequestState]) -> list[OutputDelta]:
        """Each state's OutputDelta: what its cumulative RequestOutput adds to the last one sent (the engine-core
        process's outputs; serval.engine.core_messages.OutputDecoder rebuilds the RequestOutputs). Finished
        requests are forgotten."""
        deltas = [_output_delta(state) for state in states]
        self._forget_finished(states)
        return deltas

    def _forget_finished(self, states: list[RequestState]) -> None:
        for state in states:
            if state.finished:
                del self.request_states[state.request_id]

    def _append_token(self, sequence: SequenceState, token_id: int, logprobs: dict[int, Logprob] | None,
                      now: float) -> RequestStatus | GrammarCheck | None:
        """Append the token and check its stops: the sequence's status (None: it goes on), or where its grammar
        decides, what _grammar_checked needs to read it."""
        request = sequence.request
        request.append_output_token(token_id)
        self.num_generation_tokens += 1
        if request.first_token_time is None:
            request.first_token_time = now
        request.last_token_time = now
        if logprobs is not None:
            sequence.logprobs.append(self._decoded(logprobs))
            sequence.cumulative_logprob += logprobs[token_id].logprob
        status = _token_stop(sequence, token_id)
        grammar_decides = status is None and request.grammar is not None
        text, stop_reason = sequence.text, sequence.stop_reason
        params = request.sampling_params
        if sequence.detokenizer is not None and (status is None or params.include_stop_str_in_output):
            new_text = sequence.detokenizer.push([token_id])
            sequence.text += new_text
            if status is None and params.stop and request.num_output_tokens > params.min_tokens:
                match = find_stop_string(sequence.text, len(new_text), params.stop, params.include_stop_str_in_output)
                if match is not None:
                    sequence.stop_reason = match.stop
                    sequence.text = sequence.text[:match.truncate_to]
                    status = RequestStatus.FINISHED_STOPPED
        if grammar_decides:
            return status, text, stop_reason
        return status or _length_status(request)

    def _decoded(self, logprobs: dict[int, Logprob]) -> dict[int, Logprob]:
        if self.tokenizer is not None:
            for token_id, logprob in logprobs.items():
                logprob.decoded_token = self.tokenizer.decode([token_id])
        return logprobs


def _token_stop(sequence: SequenceState, token_id: int) -> RequestStatus | None:
    """EOS and stop token ids end a request once min_tokens are out (the sampler masks them before)."""
    request = sequence.request
    params = request.sampling_params
    if request.num_output_tokens <= params.min_tokens:  # the sampler masked them for these
        return None
    if token_id == request.eos_token_id and not params.ignore_eos:
        return RequestStatus.FINISHED_STOPPED
    if token_id in params.stop_token_ids:
        sequence.stop_reason = token_id
        return RequestStatus.FINISHED_STOPPED
    return None


def _length_status(request: Request) -> RequestStatus | None:
    if request.num_output_tokens >= request.max_tokens or request.num_tokens >= request.max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None


# What _append_token leaves for the grammar to decide: a stop string's status, and the sequence's text and stop
# reason before the token. A tuple: this is made per constrained token on the engine thread.
GrammarCheck = tuple[RequestStatus | None, str, int | str | None]


def _grammar_checked(sequence: SequenceState, check: GrammarCheck) -> RequestStatus | None:
    """The status of a token whose other stops _append_token checked. A grammar's last token is part of the output
    (the closing brace), unlike EOS or a stop token, so it is detokenized (and stop strings looked for) before the
    grammar's status applies; a token the grammar rejects is taken out of the text again."""
    stop_status, text, stop_reason = check
    request = sequence.request
    grammar_status = _grammar_status(request, request.output_token_ids[-1])
    if grammar_status == RequestStatus.FINISHED_ERROR:
        sequence.text, sequence.stop_reason = text, stop_reason
        return grammar_status
    return stop_status or grammar_status or _length_status(request)


def _grammar_status(request: Request, token_id: int) -> RequestStatus | None:
    """Advance the grammar: STOPPED when structured output is complete (nothing but EOS could follow), ERROR when
    the grammar could not take the token (a parser limit hit on this path: the text would no longer match)."""
    grammar = request.grammar
    if grammar.advance(token_id):
        return RequestStatus.FINISHED_STOPPED if grammar.terminated else None
    logger.error("structured output failed during generation", extra={
        "request_id": request.request_id, "token_id": token_id, "grammar_sha256": grammar.digest,
        "error": grammar.error})
    return RequestStatus.FINISHED_ERROR


def _visible_text(sequence: SequenceState) -> str:
    """The text a user may see: a running sequence holds back what could begin a stop string."""
    text = sequence.text
    stop = sequence.request.sampling_params.stop
    if sequence.status is None and stop:
        text = text[:len(text) - stop_holdback(text, stop)]
    return text


def _request_output(state: RequestState) -> RequestOutput:
    completions = []
    for sequence in state.sequences:
        params = sequence.request.sampling_params
        completions.append(CompletionOutput(
            index=sequence.request.index, text=_visible_text(sequence),
            token_ids=list(sequence.request.output_token_ids),
            cumulative_logprob=sequence.cumulative_logprob if params.logprobs is not None else None,
            logprobs=sequence.logprobs, finish_reason=sequence.status.value if sequence.status else None,
            stop_reason=sequence.stop_reason))
    metrics = RequestMetrics(*_metrics_fields(state.sequences[0].request))
    return RequestOutput(request_id=state.request_id, prompt=state.prompt, prompt_token_ids=state.prompt_token_ids,
                         prompt_logprobs=state.prompt_logprobs, outputs=completions, finished=state.finished,
                         metrics=metrics, num_cached_tokens=metrics.num_cached_tokens)


def _metrics_fields(first: Request) -> tuple:
    """RequestMetrics' fields in order, of the request's first sample."""
    return (first.arrival_time, first.first_scheduled_time, first.first_token_time, first.last_token_time,
            first.finished_time, max(first.num_cached_tokens, 0), acceptance_length(first))


# ---- the engine-core process's outputs ----
# Plain tuples, not dataclasses: the core pickles a step's deltas while the engine thread waits for the GIL, and
# pickle writes a tuple in C but calls Python (__reduce_ex__, __getstate__) for every dataclass instance.
#
#   OutputDelta      (request_id, [CompletionDelta, ...] one per sample, finished, metrics, prompt)
#   CompletionDelta  (index, text, replaces_text, new_token_ids, new_logprobs, cumulative_logprob, finish_reason,
#                     stop_reason): text is appended to the text sent so far, or replaces it when replaces_text;
#                     new_logprobs one {token_id: Logprob's fields as a tuple} per new token (4x cheaper to pickle)
#   metrics          RequestMetrics' fields as a tuple (_metrics_fields)
#   prompt           (prompt, prompt_token_ids, prompt_logprobs) in a request's first delta only, else None
OutputDelta = tuple
CompletionDelta = tuple


def _output_delta(state: RequestState) -> OutputDelta:
    prompt = None
    if not state.sent_prompt:
        state.sent_prompt = True
        # A copy: the engine thread may extend the state's list (sample 0's prefill) while the core's output
        # thread pickles this one.
        prompt = (state.prompt, state.prompt_token_ids,
                  list(state.prompt_logprobs) if state.prompt_logprobs is not None else None)
    return (state.request_id, [_completion_delta(sequence) for sequence in state.sequences], state.finished,
            _metrics_fields(state.sequences[0].request), prompt)


def _completion_delta(sequence: SequenceState) -> CompletionDelta:
    """What the sample's CompletionOutput adds to the one sent last: only the new token ids and logprobs are
    copied (the text is compared with what was sent, in C)."""
    request = sequence.request
    text, sent_text = _visible_text(sequence), sequence.sent_text
    # The text only grows while the sequence runs; a grammar's rejected token can take its text back.
    appends = text.startswith(sent_text)
    sequence.sent_text = text
    token_ids = request.output_token_ids
    new_token_ids = token_ids[sequence.num_sent_token_ids:]
    sequence.num_sent_token_ids = len(token_ids)
    new_logprobs = cumulative_logprob = None
    if sequence.logprobs is not None:
        new_logprobs = [{token_id: (entry.logprob, entry.rank, entry.decoded_token) for token_id, entry in
                         position.items()} for position in sequence.logprobs[sequence.num_sent_logprobs:]]
        sequence.num_sent_logprobs = len(sequence.logprobs)
        cumulative_logprob = sequence.cumulative_logprob
    return (request.index, text[len(sent_text):] if appends else text, not appends, new_token_ids, new_logprobs,
            cumulative_logprob, sequence.status.value if sequence.status else None, sequence.stop_reason)
