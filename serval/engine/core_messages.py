"""What crosses the boundary between the API process and the engine-core process (serval.engine.core_process).

Each direction sends pickled lists of messages over one multiprocessing Connection: the core sends one message per
step, holding all that step's outputs and the engine's stats, so the API process unpickles once and hands the lot
to its event loop in one call. Plain pickle, not the Connection's own pickler: that one would put tensors in shared
memory, which the receiver would then have to keep alive.

A RequestOutput is cumulative (the whole text and every token id so far) and carries the prompt's token ids; sent
as it is, a step's message grows with every request's length. So the core sends an OutputDelta instead: what is new
since the last output it sent for that request (OutputEncoder), and the API process appends it to the last
RequestOutput it built (OutputDecoder). Both sides see the same sequence of RequestOutputs.

    core:  RequestOutput ─► OutputEncoder.encode ─► OutputDelta ─pickle─► OutputDecoder.decode ─► RequestOutput  :API
"""
from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass

from serval.config import EngineConfig
from serval.engine.engine import EngineStats
from serval.engine.memory import MemoryUsage
from serval.lora.request import LoRARequest
from serval.openai.errors import InvalidArgument
from serval.outputs import CompletionOutput, PromptLogprobs, RequestMetrics, RequestOutput, SampleLogprobs


# ---- API process → core ----
@dataclass
class AddRequest:
    """A request the API process has validated: its prompt already tokenized (the core does not tokenize again)."""
    request_id: str
    prompt: dict  # {"prompt": text or None, "prompt_token_ids": [...]}
    params: object  # SamplingParams or PoolingParams
    priority: int
    arrival_time: float  # time.monotonic() in the API process: the clock is the machine's, not the process's
    lora_request: LoRARequest | None


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class CallRequest:
    """A blocking call answered by a CallReply with the same call_id: add_lora, remove_lora, compile_grammar."""
    call_id: int
    method: str
    argument: object


@dataclass
class Shutdown:
    pass


@dataclass
class StepTaken:
    """The API process's event loops have taken step `step`'s outputs (sent only when the StepMessage asks)."""
    step: int


# ---- core → API process ----
@dataclass
class CoreReady:
    """What the API process needs to stand in for the engine: sent once, when the engine has loaded."""
    pid: int
    config: EngineConfig  # as the engine resolved it (model path, max_model_len, ...)
    has_tokenizer: bool
    vocab_size: int
    eos_token_id: int | None
    pooling_task: str | None
    instruction_prompts: object  # serval.model.pooling_model.InstructionPrompts, or None
    memory_usage: MemoryUsage
    stats: EngineStats


@dataclass
class StartupFailed:
    error: "PortableError"


@dataclass
class RequestError:
    """The request could not be added (a bad LoRA adapter, a request id already running): its stream raises."""
    request_id: str
    error: "PortableError"


@dataclass
class StepMessage:
    """One step's outputs (OutputDelta, or a PoolingRequestOutput whole: it comes once) and the stats after it.
    num_added counts the sequences the core has taken in so far, so the API process knows how many it sent are
    still on their way (num_waiting)."""
    outputs: list
    errors: list[RequestError]
    stats: EngineStats
    num_added: int
    # On CPU the core waits (briefly) for StepTaken(step) before its next step: see serval.engine.async_engine on
    # why streaming between steps, not during one, costs the step nothing. None: no answer wanted.
    step: int | None = None


@dataclass
class CallReply:
    call_id: int
    result: object
    error: "PortableError | None" = None


@dataclass
class CoreDied:
    """The core's step loop raised: every request is lost. The cause is logged in the core."""
    error: "PortableError"


# ---- errors ----
@dataclass
class PortableError:
    """An exception as a value that unpickles anywhere: InvalidArgument keeps its param (its __init__ takes two
    arguments, which pickle would not pass back)."""
    kind: str  # "invalid_argument" | "value" | "file_not_found" | "runtime"
    message: str
    param: str | None = None

    @classmethod
    def of(cls, error: BaseException) -> "PortableError":
        if isinstance(error, InvalidArgument):
            return cls("invalid_argument", str(error), error.param)
        if isinstance(error, FileNotFoundError):
            return cls("file_not_found", str(error))
        if isinstance(error, ValueError):
            return cls("value", str(error))
        return cls("runtime", f"{type(error).__name__}: {error}")

    def exception(self) -> Exception:
        if self.kind == "invalid_argument":
            return InvalidArgument(self.param, self.message)
        if self.kind == "file_not_found":
            return FileNotFoundError(self.message)
        if self.kind == "value":
            return ValueError(self.message)
        return RuntimeError(self.message)


def dumps(messages: list) -> bytes:
    return pickle.dumps(messages, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> list:
    return pickle.loads(data)


# ---- outputs as deltas ----
@dataclass(slots=True)
class CompletionDelta:
    index: int
    text: str  # appended to the text so far; the whole text when replaces_text
    new_token_ids: list[int]
    new_logprobs: SampleLogprobs | None
    cumulative_logprob: float | None
    finish_reason: str | None
    stop_reason: int | str | None
    replaces_text: bool = False


@dataclass(slots=True)
class OutputDelta:
    request_id: str
    completions: list[CompletionDelta]
    finished: bool
    metrics: RequestMetrics | None
    num_cached_tokens: int
    # The request's first delta only: what never changes afterwards.
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: PromptLogprobs | None = None


@dataclass(slots=True)
class _Sent:
    """How much of one completion the API process has: a prefix of the text and counts of the rest."""
    text: str = ""
    num_token_ids: int = 0
    num_logprobs: int = 0


class OutputEncoder:
    """Core side: RequestOutput → OutputDelta, remembering what each live request's receiver already has."""

    def __init__(self) -> None:
        self._sent: dict[str, dict[int, _Sent]] = {}

    def encode(self, output: RequestOutput) -> OutputDelta:
        first = output.request_id not in self._sent
        sent = self._sent.setdefault(output.request_id, {})
        completions = [_completion_delta(completion, sent.setdefault(completion.index, _Sent()))
                       for completion in output.outputs]
        if output.finished:
            del self._sent[output.request_id]
        delta = OutputDelta(output.request_id, completions, output.finished, output.metrics,
                            output.num_cached_tokens)
        if first:
            delta.prompt, delta.prompt_token_ids = output.prompt, output.prompt_token_ids
            delta.prompt_logprobs = output.prompt_logprobs
        return delta

    def forget(self, request_id: str) -> None:
        """The request was aborted: it sends nothing more."""
        self._sent.pop(request_id, None)


def _completion_delta(completion: CompletionOutput, sent: _Sent) -> CompletionDelta:
    text = completion.text
    appends = text.startswith(sent.text)
    new_text = text[len(sent.text):] if appends else text
    token_ids = completion.token_ids
    new_token_ids = token_ids[sent.num_token_ids:]
    # The output processor appends to one logprobs list per sample, one entry per token, perhaps while this runs
    # on another thread: the entries of this output's tokens are the ones it has.
    logprobs = completion.logprobs[:len(token_ids)] if completion.logprobs is not None else None
    new_logprobs = logprobs[sent.num_logprobs:] if logprobs is not None else None
    sent.text, sent.num_token_ids = text, len(token_ids)
    sent.num_logprobs = len(logprobs) if logprobs is not None else 0
    return CompletionDelta(completion.index, new_text, new_token_ids, new_logprobs, completion.cumulative_logprob,
                           completion.finish_reason, completion.stop_reason, replaces_text=not appends)


class OutputDecoder:
    """API side: OutputDelta → the cumulative RequestOutput the in-process engine would have returned."""

    def __init__(self) -> None:
        self._latest: dict[str, RequestOutput] = {}

    def decode(self, delta: OutputDelta) -> RequestOutput:
        previous = self._latest.get(delta.request_id)
        if previous is None:
            previous = RequestOutput(delta.request_id, delta.prompt, delta.prompt_token_ids or [],
                                     delta.prompt_logprobs, [], False)
        completions = {completion.index: completion for completion in previous.outputs}
        outputs = [_apply(completions.get(change.index), change) for change in delta.completions]
        output = dataclasses.replace(previous, outputs=outputs, finished=delta.finished, metrics=delta.metrics,
                                     num_cached_tokens=delta.num_cached_tokens)
        if delta.finished:
            self._latest.pop(delta.request_id, None)
        else:
            self._latest[delta.request_id] = output
        return output

    def forget(self, request_id: str) -> None:
        self._latest.pop(request_id, None)


def _apply(previous: CompletionOutput | None, change: CompletionDelta) -> CompletionOutput:
    if previous is None:
        previous = CompletionOutput(change.index, "", [], None, [] if change.new_logprobs is not None else None)
    text = change.text if change.replaces_text else previous.text + change.text
    logprobs = previous.logprobs
    if change.new_logprobs is not None:
        # The in-process engine shares one growing list between a request's outputs; a new list per output
        # keeps what a reader already holds unchanged, which is all it could rely on anyway.
        logprobs = (logprobs or []) + change.new_logprobs
    return CompletionOutput(change.index, text, previous.token_ids + change.new_token_ids, change.cumulative_logprob,
                            logprobs, change.finish_reason, change.stop_reason)

