"""Reports of a `bench serve` run: terminal table, summary.json, requests.jsonl, report.md, PNG plots."""
from __future__ import annotations

import json
import math
import os

from serval.bench.metrics import PERCENTILES, RequestResult

ROWS = [  # (label, path into a run, format)
    ("Successful requests", ("summary", "completed"), "{:d}"),
    ("Failed requests", ("summary", "failed"), "{:d}"),
    ("Errors by type", ("summary", "errors"), None),
    ("Benchmark duration (s)", ("summary", "duration_s"), "{:.2f}"),
    ("Total input tokens", ("summary", "total_input_tokens"), "{:d}"),
    ("Total output tokens", ("summary", "total_output_tokens"), "{:d}"),
    ("Requests with tool calls", ("summary", "requests_with_tool_calls"), "{:d}"),
    ("Request throughput (req/s)", ("summary", "request_throughput"), "{:.2f}"),
    ("Output token throughput (tok/s)", ("summary", "output_throughput"), "{:.1f}"),
    ("Total token throughput (tok/s)", ("summary", "total_token_throughput"), "{:.1f}"),
    ("Spec decode acceptance rate (server)", ("summary", "spec_decode", "acceptance_rate"), "{:.1%}"),
    ("Spec decode acceptance length (server)", ("summary", "spec_decode", "acceptance_length"), "{:.2f}"),
    ("Prefix cache hit rate (server)", ("summary", "prefix_cache", "hit_rate"), "{:.1%}"),
    ("SLO attainment", ("summary", "slo_attainment"), "{:.1%}"),
    ("Request goodput (req/s)", ("summary", "request_goodput"), "{:.2f}"),
] + [(f"{name.upper()} {stat} (ms)", ("summary", f"{name}_ms", stat), "{:.2f}")
     for name in ("ttft", "tpot", "itl", "e2el", "e2e")
     for stat in ("mean", "median", *(f"p{p}" for p in PERCENTILES if p != 50))] + [
    ("Client wait mean (ms)", ("summary", "wait_ms", "mean"), "{:.2f}"),
    ("$ / 1M output tokens", ("cost", "usd_per_1m_output_tokens"), "{:.4f}"),
    ("$ / 1M total tokens", ("cost", "usd_per_1m_total_tokens"), "{:.4f}"),
    ("$ / 1M output tokens at SLO", ("cost", "usd_per_1m_output_tokens_at_slo"), "{:.4f}"),
]


def _lookup(run: dict, path: tuple, fmt: str | None) -> str:
    value = run
    for key in path:
        if value is None:
            return "-"
        value = value.get(key)
    if value is None:
        return "-"
    if fmt is None:
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "none"
    return fmt.format(value)


def run_tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """One table per request rate: (title, header, rows) with one column per endpoint."""
    rates = []
    for endpoint in report["endpoints"]:
        for run in endpoint["runs"]:
            if run["request_rate"] not in rates:
                rates.append(run["request_rate"])
    tables = []
    for rate in rates:
        runs = [next((run for run in e["runs"] if run["request_rate"] == rate), None) for e in report["endpoints"]]
        header = ["Metric"] + [e["endpoint"]["name"] for e in report["endpoints"]]
        rows = [[label] + [_lookup(run, path, fmt) if run else "not run" for run in runs]
                for label, path, fmt in ROWS if not (path[0] == "cost" and all(r is None or r["cost"] is None for r in runs))]
        concurrency = report["config"]["load"]["max_concurrency"]
        title = f"request rate {rate}" + (f", max concurrency {concurrency}" if concurrency else "")
        tables.append((title, header, rows))
    return tables


def terminal_table(report: dict) -> str:
    out = []
    for title, header, rows in run_tables(report):
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        line = "-" * (sum(widths) + 3 * (len(widths) - 1))
        out += [f"== {title} ==", " | ".join(h.ljust(w) for h, w in zip(header, widths)), line]
        out += [" | ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                for row in rows]
        out.append("")
    out.append(best_rates_line(report))
    return "\n".join(out)


def best_rates_line(report: dict) -> str:
    slo = report["config"]["slo_ms"]
    target = report["config"]["slo_attainment"]
    slo_text = ", ".join(f"{k}<={v:g}ms" for k, v in slo.items()) or "no SLO (success only)"
    parts = [f"{e['endpoint']['name']}: {e['best_rate_meeting_slo'] if e['best_rate_meeting_slo'] is not None else 'none'}"
             for e in report["endpoints"]]
    return f"Highest rate meeting SLOs ({slo_text}, {target:.0%} of requests): " + "; ".join(parts)


def markdown(report: dict) -> str:
    config = report["config"]
    workload, load = config["workload"], config["load"]
    lines = ["# Serving benchmark", "",
             f"Workload `{workload['name']}`: {workload['num_prompts']} prompts, input {workload['input_len']} "
             f"tokens, output {workload['output_len']} tokens, range ratio {workload['range_ratio']}, seed "
             f"{workload['seed']}; tokenizer `{config['tokenizer'] or 'default'}`.",
             f"Load: rates {config['rates']} req/s, burstiness {load['burstiness']}, max concurrency "
             f"{load['max_concurrency']}, duration {load['duration']}, warm-up {load['num_warmups']} requests.", "",
             "| Endpoint | Engine | Base URL | Model | API |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {e['endpoint']['name']} | {e['endpoint']['engine'] or '?'} | {e['endpoint']['base_url']} | "
              f"{e['endpoint']['model']} | {e['endpoint']['api']} |" for e in report["endpoints"]]
    for title, header, rows in run_tables(report):
        lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", best_rates_line(report), "",
              "Definitions (vLLM benchmark_serving): TTFT = first streamed token - request sent; "
              "TPOT = (E2EL - TTFT) / (output tokens - 1); ITL = gaps between streamed chunks; "
              "E2EL = last byte - request sent; E2E = E2EL + client wait. See docs/bench.md."]
    plots = [name for name in report.get("plots", [])]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def plots(report: dict, results: dict[str, dict[float, list[RequestResult]]], result_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rates = sorted({rate for per_rate in results.values() for rate in per_rate})
    for rate in rates:
        figure, axes = plt.subplots(1, 4, figsize=(16, 3.8))
        for name, per_rate in results.items():
            done = [r for r in per_rate.get(rate, []) if r.success]
            series = {"TTFT": [r.ttft for r in done if r.ttft is not None],
                      "TPOT": [r.tpot for r in done if r.tpot is not None],
                      "ITL": [gap for r in done for gap in r.itl], "E2E": [r.e2e for r in done]}
            for axis, (metric, values) in zip(axes, series.items()):
                if values:
                    values = sorted(v * 1000.0 for v in values)
                    axis.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=name)
                axis.set(title=f"{metric} CDF", xlabel="ms", ylabel="share of requests" if metric == "TTFT" else None)
        axes[0].legend()
        label = "inf" if math.isinf(rate) else f"{rate:g}"
        figure.suptitle(f"Latency CDFs at request rate {label}")
        figure.tight_layout()
        filename = f"latency_cdf_rate_{label}.png"
        figure.savefig(os.path.join(result_dir, filename), dpi=90)
        plt.close(figure)
        written.append(filename)
    for metric, key, ylabel, filename in (("output throughput", ("output_throughput",), "tokens/s", "throughput_vs_rate.png"),
                                          ("TTFT p50 / p99", ("ttft_ms",), "ms", "ttft_vs_rate.png")):
        figure, axis = plt.subplots(figsize=(6.5, 4))
        for endpoint in report["endpoints"]:
            runs = [run for run in endpoint["runs"] if run["request_rate"] != "inf"]
            if not runs:
                continue
            xs = [run["request_rate"] for run in runs]
            if key[0] == "ttft_ms":
                line, = axis.plot(xs, [run["summary"]["ttft_ms"]["median"] for run in runs], "o-",
                                  label=f"{endpoint['endpoint']['name']} p50")
                axis.plot(xs, [run["summary"]["ttft_ms"]["p99"] for run in runs], "o--", color=line.get_color(),
                          label=f"{endpoint['endpoint']['name']} p99")
            else:
                axis.plot(xs, [run["summary"]["output_throughput"] for run in runs], "o-",
                          label=endpoint["endpoint"]["name"])
        axis.set(title=f"{metric} vs request rate", xlabel="request rate (req/s)", ylabel=ylabel)
        if axis.lines:
            axis.legend()
        figure.tight_layout()
        figure.savefig(os.path.join(result_dir, filename), dpi=90)
        plt.close(figure)
        written.append(filename)
    return written


def write_results(report: dict, results: dict[str, dict[float, list[RequestResult]]], result_dir: str,
                  make_plots: bool = True) -> None:
    os.makedirs(result_dir, exist_ok=True)
    report["plots"] = plots(report, results, result_dir) if make_plots else []
    with open(os.path.join(result_dir, "summary.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    with open(os.path.join(result_dir, "requests.jsonl"), "w") as handle:
        for name, per_rate in results.items():
            for rate, rows in per_rate.items():
                for result in rows:
                    handle.write(json.dumps({"endpoint": name, "request_rate": "inf" if math.isinf(rate) else rate,
                                             **result.to_json()}) + "\n")
    with open(os.path.join(result_dir, "report.md"), "w") as handle:
        handle.write(markdown(report))
