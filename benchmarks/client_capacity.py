"""How many requests per second one `serval bench serve` client process sustains (the client must not be the
bottleneck). Against the stub server (serval.bench.stub_server: no model, tokens sent at once), at doubling
Poisson rates: a rate is sustained when the client keeps up with the schedule (p99 client lag < 50 ms) and
completes >= 95% of the offered rate. Prints a table and writes JSON.

    python benchmarks/client_capacity.py [--output-len 16] [--seconds 3] [--json client_capacity.json]
"""
from __future__ import annotations

import argparse
import json
import sys

from serval.bench.endpoints import Endpoint
from serval.bench.loadgen import LoadConfig, run_endpoint
from serval.bench.metrics import summarize
from serval.bench.stub_server import stub_process
from serval.bench.workloads import BenchRequest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-len", type=int, default=16, help="streamed tokens (chunks) per request")
    parser.add_argument("--seconds", type=float, default=3.0, help="arrivals per rate")
    parser.add_argument("--rates", default="50,100,200,400,800,1600")
    parser.add_argument("--json", default="client_capacity.json")
    args = parser.parse_args()
    workload = [BenchRequest(user="hello " * 32, output_len=args.output_len, prompt_len=32)]
    rows, sustained = [], None
    with stub_process() as url:
        endpoint = Endpoint("stub", url, "stub")
        run_endpoint(endpoint, workload * 50, LoadConfig(progress=False), None)  # warm the connection pool
        for rate in (float(r) for r in args.rates.split(",")):
            config = LoadConfig(request_rate=rate, duration=args.seconds, progress=False, seed=0)
            summary = summarize(run_endpoint(endpoint, workload, config, None))
            offered = summary["num_requests"] / args.seconds
            ok = (summary["failed"] == 0 and summary["wait_ms"]["p99"] < 50.0
                  and summary["request_throughput"] >= 0.95 * offered * args.seconds / max(summary["duration_s"], args.seconds))
            rows.append({"rate": rate, "requests": summary["num_requests"], "completed_rps": summary["request_throughput"],
                         "chunks_per_s": summary["output_throughput"], "client_lag_p99_ms": summary["wait_ms"]["p99"],
                         "ttft_p50_ms": summary["ttft_ms"]["median"], "sustained": ok})
            sustained = rate if ok else sustained
            if not ok:
                break
    sys.stdout.write(f"{'rate':>8} {'requests':>9} {'done req/s':>11} {'chunks/s':>9} {'lag p99 ms':>11} "
                     f"{'TTFT p50 ms':>12} sustained\n")
    for row in rows:
        sys.stdout.write(f"{row['rate']:>8g} {row['requests']:>9d} {row['completed_rps']:>11.1f} {row['chunks_per_s']:>9.0f} "
                         f"{row['client_lag_p99_ms']:>11.2f} {row['ttft_p50_ms']:>12.2f} {row['sustained']}\n")
    sys.stdout.write(f"highest sustained rate: {sustained} req/s ({args.output_len} streamed chunks each)\n")
    with open(args.json, "w") as handle:
        json.dump({"output_len": args.output_len, "rows": rows, "sustained_rate": sustained}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
