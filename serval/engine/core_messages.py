"""What crosses the boundary between the API process and the engine-core process (serval.engine.core_process).

Each direction sends pickled lists of messages over one multiprocessing Connection: the core sends one message per
step, holding all that step's outputs and the engine's stats, so the API process unpickles once and hands the lot
to its event loop in one call. Plain pickle, not the Connection's own pickler: that one would put tensors in shared
memory, which the receiver would then have to keep alive.

A RequestOutput is cumulative (the whole text and every token id so far) and carries the prompt's token ids; built
and sent as it is, a step's work and message grow with every request's length. So the core's engine builds an
OutputDelta instead, a plain tuple of what is new since the last one it sent for that request (the prompt in the
first only), straight from the output processor's state (OutputProcessor.make_deltas; the layout is beside it);
the API process appends it to the last RequestOutput it built (OutputDecoder). The API process sees the same
sequence of RequestOutputs as the in-process engine returns.

  core:  OutputProcessor.make_deltas ─► OutputDelta ─pickle─► OutputDecoder.decode ─► RequestOutput  :API
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass

from serval.config import EngineConfig
from serval.engine.engine import EngineStats
from serval.engine.memory import MemoryUsage
from serval.engine.output_processor import CompletionDelta, OutputDelta
from serval.lora.request import LoRARequest
from serval.openai.errors import InvalidArgument
from serval.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput


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
    """A blocking call answered by a CallReply with the same call_id: add_lora, remove_lora, warm_grammar_compiler,
    start_profile, stop_profile."""
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
    """One step's outputs (OutputDelta tuples, or a PoolingRequestOutput whole: it comes once) and the stats after it.
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
class OutputDecoder:
    """API side: OutputDelta (serval.engine.output_processor's tuple) → the cumulative RequestOutput the in-process
    engine would have returned."""

    def __init__(self) -> None:
        self._latest: dict[str, RequestOutput] = {}

    def decode(self, delta: OutputDelta) -> RequestOutput:
        request_id, changes, finished, metrics_fields, prompt = delta
        previous = self._latest.get(request_id)
        if previous is None:
            text, token_ids, logprobs = prompt if prompt is not None else (None, [], None)
            previous = RequestOutput(request_id, text, token_ids, logprobs, [], False)
        # Every delta has each sample's change, in the same order: the previous output's completions line up.
        completions = previous.outputs or [None] * len(changes)
        metrics = RequestMetrics(*metrics_fields)
        output = RequestOutput(request_id, previous.prompt, previous.prompt_token_ids, previous.prompt_logprobs,
                               [_apply(completion, change) for completion, change in zip(completions, changes)],
                               finished, metrics, metrics.num_cached_tokens)
        if finished:
            self._latest.pop(request_id, None)
        else:
            self._latest[request_id] = output
        return output

    def forget(self, request_id: str) -> None:
        self._latest.pop(request_id, None)


def _apply(previous: CompletionOutput | None, change: CompletionDelta) -> CompletionOutput:
    index, text, replaces_text, new_token_ids, new_logprobs, cumulative_logprob, finish_reason, stop_reason = change
    if previous is None:
        previous = CompletionOutput(index, "", [], None, [] if new_logprobs is not None else None)
    logprobs = previous.logprobs
    if new_logprobs is not None:
        # The in-process engine shares one growing list between a request's outputs; a new list per output
        # keeps what a reader already holds unchanged, which is all it could rely on anyway.
        logprobs = (logprobs or []) + [{token_id: Logprob(*fields) for token_id, fields in position.items()}
                                       for position in new_logprobs]
    return CompletionOutput(index, text if replaces_text else previous.text + text,
                            previous.token_ids + new_token_ids, cumulative_logprob, logprobs, finish_reason,
                            stop_reason)
