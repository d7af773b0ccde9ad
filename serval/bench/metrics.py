"""Per-request results and the summary statistics, with vLLM benchmark_serving's definitions.

Times are seconds (summaries in ms, as vLLM prints). For request i:
  ttft  = first content chunk received - request sent
  itl   = gaps between consecutive content chunks (one entry per gap, all requests pooled)
  e2el  = last byte received - request sent                         (vLLM's E2EL)
  tpot  = (e2el - ttft) / (output_tokens - 1), requests with more than one output token
  wait  = request sent - request's scheduled arrival (client queueing: --max-concurrency, or a lagging client)
  e2e   = wait + e2el, what the user waits                          (the SLO's e2e)
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el", "e2e", "wait")
SLO_KEYS = {"ttft": "ttft", "tpot": "tpot", "e2e": "e2e", "e2el": "e2e"}


@dataclass
class RequestResult:
    index: int
    scheduled: float  # seconds after the run's start
    sent: float = 0.0
    end: float = 0.0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    usage_from_server: bool = False
    error_type: str | None = None  # connect, timeout, http_<status>, stream, ...
    error: str | None = None
    conversation_id: int | None = None
    turn: int = 0
    output_text: str = ""
    tool_calls: int = 0  # chat: calls the streamed answer made (their tokens are in output_tokens, from usage)

    @property
    def success(self) -> bool:
        return self.error_type is None

    @property
    def e2el(self) -> float:
        return self.end - self.sent

    @property
    def wait(self) -> float:
        return self.sent - self.scheduled

    @property
    def e2e(self) -> float:
        return self.end - self.scheduled

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens <= 1:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict:
        row = asdict(self)
        row.pop("output_text")
        row.update(e2el=self.e2el if self.success else None, e2e=self.e2e if self.success else None,
                   wait=self.wait, tpot=self.tpot)
        return row


def parse_slo(text: str | None) -> dict[str, float]:
    """'ttft=500,tpot=50,e2e=10000' (ms; ':' works too, and e2el means e2e) -> {'ttft': 0.5, ...} in seconds."""
    if not text:
        return {}
    slo = {}
    for part in text.replace(" ", ",").split(","):
        if not part:
            continue
        key, sep, value = part.replace(":", "=").partition("=")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"invalid --slo: {part!r}; allowed: ttft=MS,tpot=MS,e2e=MS")
        try:
            milliseconds = float(value)
        except ValueError:
            raise ValueError(f"invalid --slo: {part!r}; the value must be milliseconds") from None
        if milliseconds <= 0:
            raise ValueError(f"invalid --slo: {part!r}; the value must be > 0")
        slo[SLO_KEYS[key]] = milliseconds / 1000.0
    return slo


def meets_slo(result: RequestResult, slo: dict[str, float]) -> bool:
    """vLLM's goodput rule: a successful request meeting every given SLO (tpot counts as 0 for one token)."""
    if not result.success:
        return False
    values = {"ttft": result.ttft or 0.0, "tpot": result.tpot or 0.0, "e2e": result.e2e}
    return all(values[key] <= limit for key, limit in slo.items())


def stats_ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "std": None, **{f"p{p}": None for p in PERCENTILES}}
    array = np.asarray(values, dtype=float) * 1000.0
    out = {"mean": float(array.mean()), "median": float(np.median(array)), "std": float(array.std())}
    out.update({f"p{p}": float(np.percentile(array, p)) for p in PERCENTILES})
    return out


def summarize(results: list[RequestResult], slo: dict[str, float] | None = None) -> dict:
    slo = slo or {}
    done = [r for r in results if r.success]
    start = min((r.scheduled for r in results), default=0.0)
    duration = max((r.end for r in results), default=0.0) - start
    per_second = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    input_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    good = [r for r in done if meets_slo(r, slo)]
    summary = {
        "num_requests": len(results), "completed": len(done), "failed": len(results) - len(done),
        "errors": dict(Counter(r.error_type for r in results if not r.success)),
        "duration_s": duration, "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "usage_from_server": bool(done) and all(r.usage_from_server for r in done),
        "tool_calls": sum(r.tool_calls for r in done),
        "requests_with_tool_calls": sum(1 for r in done if r.tool_calls),
        "request_throughput": per_second(len(done)), "output_throughput": per_second(output_tokens),
        "total_token_throughput": per_second(input_tokens + output_tokens),
        "slo_ms": {key: value * 1000.0 for key, value in slo.items()},
        "good_requests": len(good), "slo_attainment": len(good) / len(results) if results else 0.0,
        "request_goodput": per_second(len(good)), "good_output_throughput": per_second(sum(r.output_tokens for r in good)),
        "good_total_token_throughput": per_second(sum(r.prompt_tokens + r.output_tokens for r in good)),
    }
    series = {
        "ttft": [r.ttft for r in done if r.ttft is not None],
        "tpot": [r.tpot for r in done if r.tpot is not None],
        "itl": [gap for r in done for gap in r.itl],
        "e2el": [r.e2el for r in done], "e2e": [r.e2e for r in done], "wait": [r.wait for r in results],
    }
    for name in LATENCY_METRICS:
        summary[f"{name}_ms"] = stats_ms(series[name])
    return summary
