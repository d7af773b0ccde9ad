"""Requirements + bench result directories -> a ranked recommendation with reasons.

Per measured endpoint: capacity = request goodput (req/s meeting the SLOs) at the highest swept rate whose
SLO attainment reaches the target, recomputed from requests.jsonl with the user's SLOs; replicas =
ceil(peak_rate / capacity); monthly cost = replicas * GPUs per replica * $/GPU-hour * 730 h.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from serval.advise.requirements import Requirements
from serval.advise.rules import CLAIM_TEXT, ENGINES, requirement_gaps
from serval.bench.cost import HOURS_PER_MONTH


@dataclass
class Candidate:
    name: str
    engine: str | None
    source: str | None = None  # result directory; None: not measured
    capacity_rps: float | None = None  # SLO-meeting requests/s of one replica
    capacity_rate: float | str | None = None  # the swept rate it came from
    gpus_per_replica: int = 1
    gpu_hour_price: float | None = None
    replicas: int | None = None
    monthly_cost: float | None = None
    ttft_p99_ms: float | None = None
    blocking: list[str] = field(default_factory=list)
    soft: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def rank_key(self) -> tuple:
        measured_ok = self.capacity_rps is not None and self.capacity_rps > 0
        return (len(self.blocking) > 0, not measured_ok, len(self.soft),
                self.monthly_cost if self.monthly_cost is not None else math.inf, self.ttft_p99_ms or math.inf)


def load_results(result_dir: str) -> tuple[dict, list[dict]]:
    summary_path = os.path.join(result_dir, "summary.json")
    if not os.path.exists(summary_path):
        raise ValueError(f"invalid result directory {result_dir!r}: no summary.json (run serval bench serve --result-dir)")
    with open(summary_path) as handle:
        report = json.load(handle)
    rows = []
    requests_path = os.path.join(result_dir, "requests.jsonl")
    if os.path.exists(requests_path):
        with open(requests_path) as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
    return report, rows


def meets(row: dict, slo_ms: dict[str, float]) -> bool:
    if row.get("error_type"):
        return False
    values = {"ttft": row.get("ttft") or 0.0, "tpot": row.get("tpot") or 0.0, "e2e": row.get("e2e") or 0.0}
    return all(values[key] * 1000.0 <= limit for key, limit in slo_ms.items())


def measure(candidate: Candidate, endpoint: dict, report: dict, rows: list[dict], req: Requirements) -> None:
    slo_ms = req.slo_ms or report["config"]["slo_ms"]
    best = None
    for run in endpoint["runs"]:
        mine = [r for r in rows if r["endpoint"] == candidate.name and r["request_rate"] == run["request_rate"]]
        if not mine:
            continue
        good = sum(meets(r, slo_ms) for r in mine)
        duration = run["summary"]["duration_s"]
        attainment, goodput = good / len(mine), (good / duration if duration > 0 else 0.0)
        if attainment >= req.slo_attainment and (best is None or goodput > best[0]):
            best = (goodput, run, attainment)
    slo_text = ", ".join(f"{k}<={v:g} ms" for k, v in slo_ms.items()) or "success only"
    if best is None:
        candidate.capacity_rps = 0.0
        candidate.reasons.append(f"measured: no swept rate kept {req.slo_attainment:.0%} of requests within {slo_text}")
        return
    goodput, run, attainment = best
    candidate.capacity_rps, candidate.capacity_rate = goodput, run["request_rate"]
    candidate.ttft_p99_ms = run["summary"]["ttft_ms"]["p99"]
    candidate.replicas = max(1, math.ceil(req.peak_rate / goodput)) if goodput > 0 else None
    candidate.reasons.append(f"measured: {goodput:.2f} req/s within {slo_text} ({attainment:.0%} of requests) at "
                             f"rate {run['request_rate']} -> {candidate.replicas} replica(s) for {req.peak_rate:g} req/s")
    if run is endpoint["runs"][-1] and run["request_rate"] != "inf":
        candidate.reasons.append("the highest swept rate met the SLOs: one replica may serve more (sweep higher rates)")
    if candidate.gpu_hour_price is not None and candidate.replicas:
        candidate.monthly_cost = candidate.replicas * candidate.gpus_per_replica * candidate.gpu_hour_price * HOURS_PER_MONTH
        candidate.reasons.append(f"cost: {candidate.replicas} x {candidate.gpus_per_replica} GPU x "
                                 f"${candidate.gpu_hour_price:g}/h x {HOURS_PER_MONTH:g} h = ${candidate.monthly_cost:,.0f}/month")


def not_measured(report: dict, rows: list[dict], req: Requirements) -> list[str]:
    gaps = []
    workload = report["config"]["workload"]
    longest = int(workload["input_len"] * (1 + workload["range_ratio"])) + int(workload["output_len"] * (1 + workload["range_ratio"]))
    if workload["name"] == "shared-prefix":
        longest += workload["prefix_len"]
    if req.max_context and req.max_context > longest:
        gaps.append(f"context {req.max_context} tokens: runs went up to ~{longest}")
    if req.modality != "text":
        gaps.append(f"{req.modality} inputs: the benchmark sends text only")
    rates = [run["request_rate"] for e in report["endpoints"] for run in e["runs"] if run["request_rate"] != "inf"]
    if rates and req.peak_rate > max(rates):
        gaps.append(f"peak {req.peak_rate:g} req/s is above the highest measured rate {max(rates):g}: replicas assume linear scaling")
    if req.compliance:
        gaps.append(f"{', '.join(req.compliance)}: capabilities from rules of thumb, not tested")
    return gaps


def disagreements(candidates: list[Candidate], workload_name: str) -> list[str]:
    out = []
    measured = [c for c in candidates if c.capacity_rps is not None and c.engine]
    for candidate in measured:
        traits = ENGINES.get(candidate.engine)
        for claim in traits.claims if traits else ():
            if claim == "shared-prefix" and workload_name != "shared-prefix":
                continue
            beaten = [o for o in measured if o.engine != candidate.engine and o.capacity_rps > candidate.capacity_rps]
            if beaten:
                winner = max(beaten, key=lambda o: o.capacity_rps)
                out.append(f"rule of thumb: {candidate.engine} has the {CLAIM_TEXT[claim]}; measured: {winner.name} "
                           f"({winner.engine}) served {winner.capacity_rps:.2f} req/s vs {candidate.capacity_rps:.2f}. "
                           "The measurement decides.")
    return out


def advise(req: Requirements, result_dirs: list[str]) -> dict:
    candidates, gaps, notes = [], [], []
    for result_dir in result_dirs:
        report, rows = load_results(result_dir)
        config = report["config"]
        for endpoint in report["endpoints"]:
            info = endpoint["endpoint"]
            candidate = Candidate(name=info["name"], engine=info.get("engine"), source=result_dir,
                                  gpus_per_replica=config.get("num_gpus", 1),
                                  gpu_hour_price=req.gpu_hour_price if req.gpu_hour_price is not None else config.get("gpu_hour_price"))
            measure(candidate, endpoint, report, rows, req)
            candidates.append(candidate)
        gaps += [f"{result_dir}: {gap}" for gap in not_measured(report, rows, req)]
        notes += disagreements([c for c in candidates if c.source == result_dir], config["workload"]["name"])
    measured_engines = {c.engine for c in candidates}
    for engine in ENGINES:
        if engine not in measured_engines:
            candidates.append(Candidate(name=engine, engine=engine, reasons=["not measured: rules of thumb only"]))
    for candidate in candidates:
        candidate.blocking, candidate.soft = requirement_gaps(candidate.engine, req) if candidate.engine else \
            ([], ["engine unknown (set engine: in the endpoints file): capabilities not checked"])
        if candidate.capacity_rps and candidate.blocking:
            notes.append(f"{candidate.name} was measured on this run's hardware, but the rules of thumb say it "
                         f"{'; '.join(candidate.blocking)}: check which is right for your target hardware")
    candidates.sort(key=Candidate.rank_key)
    return {"requirements": req.__dict__, "ranking": [c.__dict__ for c in candidates],
            "not_measured": gaps, "disagreements": notes}


def format_advice(advice: dict) -> str:
    lines = ["# Recommendation", ""]
    for position, c in enumerate(advice["ranking"], start=1):
        cost = f"${c['monthly_cost']:,.0f}/month" if c["monthly_cost"] is not None else "cost unknown"
        capacity = (f"{c['replicas']} replica(s), {cost}" if c["replicas"] else
                    "cannot meet the SLOs as measured" if c["capacity_rps"] == 0 else "not measured")
        lines.append(f"{position}. **{c['name']}** ({c['engine'] or 'engine ?'}): {capacity}")
        lines += [f"   - {reason}" for reason in c["reasons"]]
        lines += [f"   - does not meet a requirement: {gap}" for gap in c["blocking"]]
        lines += [f"   - caveat: {gap}" for gap in c["soft"]]
    if advice["disagreements"]:
        lines += ["", "## Where rules of thumb and measurements disagree", ""] + [f"- {n}" for n in advice["disagreements"]]
    lines += ["", "## Not measured", ""] + ([f"- {gap}" for gap in advice["not_measured"]] or ["- nothing flagged"])
    return "\n".join(lines) + "\n"
