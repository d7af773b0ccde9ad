"""`serval bench serve`: one workload against each endpoint, at each request rate, then the reports.

Endpoints run one after another, never at once: side by side they would share the client (and often the
GPUs), and each would measure the other. Every endpoint gets the same requests on the same arrival schedule.
Each rate of a sweep sends its own prompts (workloads_per_rate): the same prompts again would find the previous
rate's KV blocks in a server's prefix cache, and later rates would measure cache hits, not the workload.
"""
from __future__ import annotations

import logging
import math
import dataclasses
from dataclasses import asdict, dataclass, field

from serval.bench.cost import run_cost
from serval.bench.endpoints import Endpoint
from serval.bench.loadgen import LoadConfig, run_endpoint
from serval.bench.metrics import RequestResult, summarize
from serval.bench.server_metrics import prefix_cache_summary, server_counters, spec_decode_summary
from serval.bench.tokenizer import BenchTokenizer
from serval.bench.workloads import BenchRequest, WorkloadConfig, build_workload

logger = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    workload: WorkloadConfig
    load: LoadConfig
    rates: list[float]  # one run per rate; --sweep gives several
    slo: dict[str, float] = field(default_factory=dict)  # seconds
    slo_attainment: float = 0.95  # a rate "meets the SLOs" when this share of its requests does
    gpu_hour_price: float | None = None
    num_gpus: int = 1
    tokenizer: str | None = None
    reuse_prompts: bool = False  # every rate sends the same prompts (workloads_per_rate)

    def __post_init__(self) -> None:
        if not 0 < self.slo_attainment <= 1:
            raise ValueError(f"invalid --slo-attainment: {self.slo_attainment}; allowed: 0 < x <= 1")

    def to_json(self) -> dict:
        out = asdict(self)
        out["slo_ms"] = {key: value * 1000.0 for key, value in out.pop("slo").items()}
        out["rates"] = [rate_json(rate) for rate in self.rates]
        out["load"]["request_rate"] = rate_json(self.load.request_rate)
        out["workload"].pop("extra")
        return out


def rate_json(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


# The warm-ups' prompts are drawn with this far-off seed, so they repeat none of the measured ones.
WARMUP_SEED_OFFSET = 1_000_003


def workloads_per_rate(config: ServeConfig, tokenizer: BenchTokenizer) -> dict[float, list[BenchRequest]]:
    """Each rate's requests: the workload drawn with seed + i for the i-th rate (ascending), so no prompt repeats
    across rates; a jsonl file, or config.reuse_prompts, gives every rate the same requests."""
    if config.reuse_prompts or config.workload.name == "jsonl":
        workload = build_workload(config.workload, tokenizer)
        return {rate: workload for rate in config.rates}
    return _drawn_per_rate(config, tokenizer, 0)


def warmups_per_rate(config: ServeConfig, tokenizer: BenchTokenizer) -> dict[float, list[BenchRequest] | None]:
    """Each rate's warm-up requests: prompts of their own (seed + WARMUP_SEED_OFFSET + i), the same for every
    endpoint, so the measured requests find none of them in a prefix cache. None (the measured requests' first
    ones) without warm-ups, with a jsonl file or with reuse_prompts."""
    if not config.load.num_warmups or config.reuse_prompts or config.workload.name == "jsonl":
        return {rate: None for rate in config.rates}
    return _drawn_per_rate(config, tokenizer, WARMUP_SEED_OFFSET, num_prompts=config.load.num_warmups)


def _drawn_per_rate(config: ServeConfig, tokenizer: BenchTokenizer, seed_offset: int,
                    **changes) -> dict[float, list[BenchRequest]]:
    """The workload drawn for the i-th rate (ascending) with seed + seed_offset + i, and `changes` to its config."""
    return {rate: build_workload(dataclasses.replace(config.workload, seed=config.workload.seed + seed_offset + index,
                                                     **changes), tokenizer)
            for index, rate in enumerate(sorted(config.rates))}


def bench_endpoint(endpoint: Endpoint, workloads: dict[float, list[BenchRequest]], config: ServeConfig,
                   tokenizer: BenchTokenizer | None, warmups: dict[float, list[BenchRequest] | None] | None = None,
                   ) -> tuple[dict, dict[float, list[RequestResult]]]:
    """Runs every rate (stopping after the first that misses the SLOs); returns the endpoint's summary and results."""
    runs, per_rate = [], {}
    for rate in sorted(config.rates):
        load = dataclasses.replace(config.load, request_rate=rate)
        label = f"rate={rate_json(rate)}"
        counters_before = server_counters(endpoint.base_url, endpoint.api_key)
        results = run_endpoint(endpoint, workloads[rate], load, tokenizer, label, (warmups or {}).get(rate))
        summary = summarize(results, config.slo)
        counters_after = server_counters(endpoint.base_url, endpoint.api_key) if counters_before else {}
        summary["spec_decode"] = spec_decode_summary(counters_before, counters_after)
        summary["prefix_cache"] = prefix_cache_summary(counters_before, counters_after)
        per_rate[rate] = results
        meets = summary["completed"] > 0 and summary["slo_attainment"] >= config.slo_attainment
        runs.append({"request_rate": rate_json(rate), "max_concurrency": config.load.max_concurrency,
                     "meets_slo": meets, "summary": summary,
                     "cost": run_cost(summary, config.gpu_hour_price, config.num_gpus)})
        logger.info("run finished", extra={"endpoint": endpoint.name, "rate": rate, "completed": summary["completed"],
                                           "failed": summary["failed"], "slo_attainment": summary["slo_attainment"]})
        if not meets and len(config.rates) > 1:
            break  # higher rates only queue more
    best = max((run for run in runs if run["meets_slo"]), default=None,
               key=lambda run: math.inf if run["request_rate"] == "inf" else run["request_rate"])
    return {"endpoint": endpoint.to_json(), "runs": runs,
            "best_rate_meeting_slo": best["request_rate"] if best else None,
            "best_run": runs.index(best) if best else None}, per_rate


def bench_serve(endpoints: list[Endpoint], workloads: dict[float, list[BenchRequest]], config: ServeConfig,
                tokenizer: BenchTokenizer | None, warmups: dict[float, list[BenchRequest] | None] | None = None,
                ) -> tuple[dict, dict[str, dict[float, list[RequestResult]]]]:
    report = {"config": config.to_json(), "endpoints": []}
    all_results = {}
    for endpoint in endpoints:
        summary, results = bench_endpoint(endpoint, workloads, config, tokenizer, warmups)
        report["endpoints"].append(summary)
        all_results[endpoint.name] = results
    return report, all_results
