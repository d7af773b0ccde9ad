"""The pooling runner's half of the engine: prefill-only requests whose output is their pooled hidden states.

A pooling request is an engine Request like any other: the same scheduler admits it, splits its prompt into chunks
and batches it with others, and the KV cache gives it blocks (prefix hits too, for last-token pooling). The model
runner returns the step's hidden states instead of sampling; each request's rows feed its PooledRows, and the step
that computes its last prompt token pools it, applies the model's head (identity for an embedder, the score head
for a classifier) and finishes it. Nothing is decoded: the request's blocks are freed in the same step.

    step k:  hidden [T, H] --rows of each request--> PooledRows.add --last chunk?--> head --> PoolingRequestOutput
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from serval.config import EngineConfig
from serval.engine.input_processor import InputProcessor, PromptType
from serval.engine.request import Request
from serval.engine.scheduler import SchedulerOutput
from serval.layers.pooling import PooledRows, PoolerConfig, normalize, truncate_dimensions
from serval.model.pooling_model import InstructionPrompts, LlamaForSequenceClassification
from serval.openai.errors import InvalidArgument
from serval.outputs import RequestMetrics
from serval.pooling_params import PoolingParams
from serval.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


# ---- outputs, with vLLM's names ----
@dataclass
class PoolingOutput:
    data: torch.Tensor  # float32 on the CPU: the embedding [dimensions], or the classifier's scores [num_labels]


@dataclass
class PoolingRequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: PoolingOutput | None  # None when it did not finish normally
    finished: bool = True
    finish_reason: str = "stop"  # "stop", or "error" when a step that held it failed
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0


@dataclass
class EmbeddingOutput:
    embedding: list[float]


@dataclass
class EmbeddingRequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True


@dataclass
class ScoringOutput:
    score: float


@dataclass
class ScoringRequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: ScoringOutput
    finished: bool = True


@dataclass
class PoolingRequestState:
    """One pooling request as the engine accepted it: its engine Request and its running reduction."""
    request: Request
    params: PoolingParams
    rows: PooledRows

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def requests(self) -> list[Request]:
        return [self.request]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids


def pooling_engine_config(config: EngineConfig, pooler: PoolerConfig) -> EngineConfig:
    """The engine arguments a pooling engine runs with: prefix hits only where the pooled rows are all computed
    anyway (last-token pooling: a hit always leaves the last token to compute; mean and CLS need every position's
    or the first position's hidden state, which a hit skips), and no decode graphs (nothing decodes)."""
    return dataclasses.replace(config, runner="pooling", enforce_eager=True,
                               enable_prefix_caching=config.enable_prefix_caching and pooler.pooling_type == "LAST")


class PoolingProcessor:
    """Validates pooling requests, feeds their hidden states to their reductions and makes their outputs."""

    def __init__(self, model: torch.nn.Module, pooler: PoolerConfig, hf_config, input_processor: InputProcessor,
                 max_model_len: int, prompts: InstructionPrompts | None = None) -> None:
        self.model = model
        self.pooler = pooler
        self.prompts = prompts or InstructionPrompts()
        self.is_classifier = isinstance(model, LlamaForSequenceClassification)
        self.output_size = model.output_size
        self.matryoshka_dimensions = getattr(hf_config, "matryoshka_dimensions", None)
        self.input_processor = input_processor
        self.max_model_len = max_model_len
        self.states: dict[str, PoolingRequestState] = {}

    # ---- requests in ----
    def new_request(self, request_id: str, prompt: PromptType, params: PoolingParams, priority: int,
                    arrival_time: float | None) -> PoolingRequestState:
        """Raises InvalidArgument naming the field at fault; touches no engine state."""
        self._check_params(params)
        tokenized = self.input_processor.tokenize_prompt(prompt)
        token_ids = tokenized.token_ids
        if not token_ids:
            raise InvalidArgument("input", "invalid input: it is empty; allowed: at least one token")
        vocab_size = self.input_processor.vocab_size
        bad = [t for t in token_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
        if bad:
            raise InvalidArgument("input", f"invalid input token ids {bad[:5]}: allowed integers in [0, {vocab_size})")
        if len(token_ids) > self.max_model_len:
            raise InvalidArgument("input", f"invalid input: it has {len(token_ids)} tokens, but max_model_len is "
                                           f"{self.max_model_len}; allowed at most {self.max_model_len} tokens")
        request = Request(request_id=request_id, prompt_token_ids=token_ids, sampling_params=SamplingParams(),
                          eos_token_id=None, max_model_len=self.max_model_len, prompt=tokenized.text,
                          priority=priority, arrival_time=time.monotonic() if arrival_time is None else arrival_time,
                          parent_request_id=request_id, pooling_params=params)
        return PoolingRequestState(request, params, PooledRows(self.pooler.pooling_type, len(token_ids)))

    def _check_params(self, params: PoolingParams) -> None:
        dimensions = params.dimensions
        if dimensions is None:
            return
        if self.is_classifier:
            raise InvalidArgument("dimensions", "invalid dimensions: this model is a classifier (scores); "
                                                "dimensions applies to embeddings only")
        if self.matryoshka_dimensions and dimensions not in self.matryoshka_dimensions:
            raise InvalidArgument("dimensions", f"invalid dimensions={dimensions}: this model was trained for "
                                                f"{sorted(self.matryoshka_dimensions)} (matryoshka_dimensions)")
        if dimensions > self.output_size:
            raise InvalidArgument("dimensions", f"invalid dimensions={dimensions}: the model's embeddings have "
                                                f"{self.output_size}; allowed 1 to {self.output_size}")

    def add(self, state: PoolingRequestState) -> None:
        if state.request_id in self.states:
            raise InvalidArgument(None, f"invalid request_id {state.request_id!r}: a request with this id is "
                                        "already running")
        self.states[state.request_id] = state

    def remove(self, request_id: str) -> PoolingRequestState | None:
        return self.states.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.states)

    # ---- one step ----
    def add_hidden_states(self, scheduled: SchedulerOutput, hidden: torch.Tensor) -> list[PoolingRequestState]:
        """Feed each scheduled request its rows of the step's hidden states (before the scheduler advances
        num_computed_tokens); return the requests whose prompt this step completed."""
        completed = []
        row = 0
        for request, num_new in zip(scheduled.requests, scheduled.num_scheduled_tokens):
            state = self.states[request.request_id]
            start = request.num_computed_tokens
            state.rows.add(hidden[row:row + num_new], start)
            row += num_new
            if start + num_new == request.num_tokens:
                completed.append(state)
        return completed

    def finish(self, completed: list[PoolingRequestState]) -> list[PoolingRequestOutput]:
        """The outputs of the requests whose prompt is all in: one batched head, one copy to the host."""
        if not completed:
            return []
        with torch.inference_mode():
            pooled = torch.stack([state.rows.pooled() for state in completed])
            results = self.model.compute_logits(pooled).float().cpu()
        now = time.monotonic()
        outputs = []
        for state, result in zip(completed, results):
            self.states.pop(state.request_id, None)
            request = state.request
            request.finished_time = now
            data = PoolingOutput(self._post(result, state.params))
            outputs.append(PoolingRequestOutput(request.request_id, request.prompt, request.prompt_token_ids, data,
                                                metrics=_metrics(request),
                                                num_cached_tokens=max(request.num_cached_tokens, 0)))
        return outputs

    def failed_output(self, state: PoolingRequestState) -> PoolingRequestOutput:
        request = state.request
        return PoolingRequestOutput(request.request_id, request.prompt, request.prompt_token_ids, None,
                                    finish_reason="error", metrics=_metrics(request))

    def _post(self, result: torch.Tensor, params: PoolingParams) -> torch.Tensor:
        if self.is_classifier:
            if params.activation is False:
                return result
            return result.sigmoid() if result.numel() == 1 else result.softmax(dim=-1)
        normalized = self.pooler.normalize if params.normalize is None else params.normalize
        vector = normalize(result) if normalized else result
        return truncate_dimensions(vector, params.dimensions, renormalize=normalized)


def _metrics(request: Request) -> RequestMetrics:
    return RequestMetrics(arrival_time=request.arrival_time, first_scheduled_time=request.first_scheduled_time,
                          finished_time=request.finished_time, num_cached_tokens=max(request.num_cached_tokens, 0))


def pair_token_ids(tokenizer, first: str, second: str) -> list[int]:
    """A cross-encoder's input: the tokenizer's own pair encoding (its special tokens between and around)."""
    if tokenizer is None:
        raise InvalidArgument("text_1", "scoring text needs a tokenizer; this engine has none")
    return list(tokenizer(text=first, text_pair=second)["input_ids"])


def cosine_similarity(first: torch.Tensor, second: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(first.float(), second.float(), dim=-1))
