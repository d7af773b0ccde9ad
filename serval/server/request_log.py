"""Structured logs: JSON lines for every logger, and one line per finished request.

A RequestRecord gathers what is known about one HTTP request (tokens, times, finish reasons, status) as its
engine outputs arrive; the server turns it into the request's log line and its span's closing attributes.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field

from serval.outputs import RequestOutput

logger = logging.getLogger("serval.request")
# The SamplingParams fields a request's log line shows: those --generation-config may set.
# Probes whose access lines only show at debug level.
QUIET_PATHS = frozenset({"/health", "/metrics"})
SAMPLING_LOGGED = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens")

# Attributes every LogRecord has; anything else on a record came from `extra=` and belongs in the JSON.
# uvicorn's color_message is its message with ANSI colours: noise in JSON.
_STANDARD_ATTRIBUTES = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName", "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
                "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class QuietProbes(logging.Filter):
    """Drops uvicorn's access lines for /health and /metrics unless the log level is debug: load balancers, the
    router and Prometheus call them every few seconds and would fill the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "uvicorn.access" or not isinstance(record.args, tuple) or len(record.args) < 3:
            return True
        path = str(record.args[2]).split("?", 1)[0]
        return path not in QUIET_PATHS or logging.getLogger().isEnabledFor(logging.DEBUG)


def configure_logging(level: str = "info") -> None:
    """JSON lines on stderr for the root logger (uvicorn's loggers included)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(QuietProbes())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


@dataclass
class RequestRecord:
    request_id: str
    model: str
    operation: str  # GenAI's operation name: "chat" | "text_completion"
    arrival_time: float = field(default_factory=time.monotonic)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    spec_decode_acceptance_length: float | None = None  # speculative decoding: mean tokens per verify step
    finish_reasons: list[str] = field(default_factory=list)
    status: int = 200
    error: str | None = None
    # The sampling values the request ran with (its own or the model's defaults), for the log line.
    sampling: dict | None = None

    def note_sampling(self, params) -> None:
        self.sampling = {name: getattr(params, name) for name in SAMPLING_LOGGED}

    def add_finished(self, output: RequestOutput) -> None:
        """Count one engine request (one prompt of the HTTP request) into the record."""
        self.add_unfinished(output)
        for completion in output.outputs:
            self.finish_reasons.append(completion.finish_reason or "abort")

    def add_unfinished(self, output: RequestOutput) -> None:
        """Count what an engine request produced before it was aborted (its client left): tokens and times, no
        finish reason (the abort adds its own)."""
        self.prompt_tokens += len(output.prompt_token_ids)
        self.cached_tokens += output.num_cached_tokens
        for completion in output.outputs:
            self.completion_tokens += len(completion.token_ids)
        metrics = output.metrics
        if metrics is not None:
            self.first_scheduled_time = _earliest(self.first_scheduled_time, metrics.first_scheduled_time)
            self.first_token_time = _earliest(self.first_token_time, metrics.first_token_time)
            if metrics.spec_decode_acceptance_length is not None:
                self.spec_decode_acceptance_length = metrics.spec_decode_acceptance_length

    @property
    def ttft_seconds(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def queue_seconds(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    def fields(self) -> dict:
        return {"request_id": self.request_id, "model": self.model, "operation": self.operation,
                "status": self.status, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cached_tokens": self.cached_tokens,
                "ttft_s": _rounded(self.ttft_seconds), "queue_s": _rounded(self.queue_seconds),
                "total_s": _rounded(time.monotonic() - self.arrival_time),
                "finish_reason": ",".join(self.finish_reasons) or None, "error": self.error,
                **({"spec_decode_acceptance_length": round(self.spec_decode_acceptance_length, 3)}
                   if self.spec_decode_acceptance_length is not None else {}),
                **(self.sampling or {})}

    def log(self) -> None:
        logger.info("request finished", extra=self.fields())


def _earliest(current: float | None, new: float | None) -> float | None:
    if current is None:
        return new
    return current if new is None else min(current, new)


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 4)
