"""The router: cache-aware vs round-robin on a shared-prefix workload, and the router's own cost.

1. Two `serval serve` replicas (the default model unless --model), fresh for each policy, behind `serval route`;
   `serval bench serve --workload shared-prefix` through the router. Reports the replicas' prefix-cache hit
   rate (serval:prefix_cache_hits_total / serval:prefix_cache_queries_total, tokens, summed over both, this
   run only) and the client's throughput and latency.
2. Router overhead: `serval bench serve` one request at a time against the stub server (no model) directly and
   through the router: the difference in TTFT and end-to-end latency is what the router adds.
3. Router capacity: the same stub, 32 requests in flight, as fast as they complete, direct and through the router.

    python benchmarks/router_bench.py [--num-prompts 96 --num-groups 16 --prefix-len 256] [--json F]

Everything runs on 127.0.0.1. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import httpx
import yaml

from serval.bench.stub_server import stub_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "smol"


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], url: str, env: dict | None = None, timeout: float = 300.0) -> subprocess.Popen:
    log = tempfile.NamedTemporaryFile(prefix="router-bench-", suffix=".log", delete=False)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                               env={**os.environ, **(env or {})})
    process.log_path = log.name  # removed by stop(); kept (and shown) when the process fails to start
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{' '.join(command)} exited:\n{open(log.name).read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise TimeoutError(f"{' '.join(command)} not ready")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    os.unlink(process.log_path)


def start_router(backends: list[dict], policy: str) -> tuple[subprocess.Popen, str]:
    config = {"backends": backends, "models": [{"name": MODEL, "policy": policy}],
              "health_check": {"interval_s": 1.0}}
    path = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    yaml.safe_dump(config, path)
    path.close()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "serval.cli", "route", "--config", path.name, "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning"]
    try:
        return start(command, url), url
    finally:
        os.unlink(path.name)  # read at startup


def bench(endpoints: dict[str, str], args: list[str]) -> dict:
    """`serval bench serve` (as a subprocess, exactly as a user runs it); returns summary.json."""
    with tempfile.TemporaryDirectory(prefix="router-bench-") as result_dir:
        command = [sys.executable, "-m", "serval.bench", "serve", "--model", MODEL, "--disable-tqdm", "--no-plots",
                   "--result-dir", result_dir, *[f"--base-url={name}={url}" for name, url in endpoints.items()],
                   *args]
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(result_dir, "summary.json")) as handle:
            return json.load(handle)


def replica_counters(url: str) -> dict[str, float]:
    """Prefix-cache hit and query tokens and finished requests of one replica, cumulative."""
    from prometheus_client.parser import text_string_to_metric_families
    names = {"serval:prefix_cache_hits_total": "hits", "serval:prefix_cache_queries_total": "queries",
             "serval:request_success_total": "requests"}
    out = dict.fromkeys(names.values(), 0.0)
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name in names:
                out[names[sample.name]] += sample.value
    return out


def run_policy(policy: str, options: argparse.Namespace) -> dict:
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    serve = [sys.executable, "-m", "serval.cli", "serve", "--host", "127.0.0.1", "--served-model-name", MODEL,
             "--max-model-len", str(options.max_model_len), "--disable-log-requests",
             "--disable-uvicorn-access-log", "--log-level", "warning", *options.serve_args]
    # One thread per replica: the two replicas share the machine's cores instead of fighting over them.
    replicas = [start(serve + ["--port", str(port)], url, env={"OMP_NUM_THREADS": str(options.threads)})
                for port, url in zip(ports, urls)]
    router = None
    try:
        backends = [{"name": f"replica{i}", "url": url, "models": [MODEL], "engine": "serval"}
                    for i, url in enumerate(urls)]
        router, router_url = start_router(backends, policy)
        before = [replica_counters(url) for url in urls]
        summary = bench({policy: router_url}, [
            "--workload", "shared-prefix", "--num-groups", str(options.num_groups), "--prefix-len",
            str(options.prefix_len), "--input-len", str(options.input_len), "--output-len", str(options.output_len),
            "--num-prompts", str(options.num_prompts), "--max-concurrency", str(options.max_concurrency),
            "--seed", "0"])
        after = [replica_counters(url) for url in urls]
    finally:
        for process in [router, *replicas]:
            if process is not None:
                stop(process)
    run = summary["endpoints"][0]["runs"][0]["summary"]
    delta = [{key: a[key] - b[key] for key in a} for a, b in zip(after, before)]
    hits, queries = sum(d["hits"] for d in delta), sum(d["queries"] for d in delta)
    return {"policy": policy, "prefix_cache_hit_rate": hits / queries if queries else 0.0,
            "prefix_cache_hit_tokens": hits, "prefix_cache_query_tokens": queries,
            # the prefill work actually done, and how it was split: what the policy changes
            "prefill_tokens_computed": queries - hits,
            "requests_per_replica": [d["requests"] for d in delta],
            "prefill_tokens_per_replica": [d["queries"] - d["hits"] for d in delta],
            "completed": run["completed"], "failed": run["failed"],
            "request_throughput": run["request_throughput"], "total_token_throughput": run["total_token_throughput"],
            "ttft_p50_ms": run["ttft_ms"]["median"], "ttft_p99_ms": run["ttft_ms"]["p99"],
            "e2el_p50_ms": run["e2el_ms"]["median"]}


def run_overhead(options: argparse.Namespace) -> dict:
    with stub_process() as stub_url:
        router, router_url = start_router([{"name": "stub", "url": stub_url, "models": [MODEL]}], "round_robin")
        try:
            endpoints = {"direct": stub_url, "router": router_url}
            latency = bench(endpoints, ["--workload", "random", "--input-len", "32", "--output-len", "8",
                                        "--num-prompts", str(options.overhead_requests), "--max-concurrency", "1",
                                        "--num-warmups", "20"])
            capacity = bench(endpoints, ["--workload", "random", "--input-len", "32", "--output-len", "8",
                                         "--num-prompts", str(options.capacity_requests), "--max-concurrency", "32",
                                         "--num-warmups", "50"])
        finally:
            stop(router)
    out = {}
    for name in endpoints:
        one = next(e for e in latency["endpoints"] if e["endpoint"]["name"] == name)["runs"][0]["summary"]
        many = next(e for e in capacity["endpoints"] if e["endpoint"]["name"] == name)["runs"][0]["summary"]
        out[name] = {"ttft_p50_ms": one["ttft_ms"]["median"], "ttft_p99_ms": one["ttft_ms"]["p99"],
                     "e2el_p50_ms": one["e2el_ms"]["median"], "e2el_p99_ms": one["e2el_ms"]["p99"],
                     "requests_per_s_at_32_in_flight": many["request_throughput"],
                     "failed": one["failed"] + many["failed"]}
    out["added"] = {key: out["router"][key] - out["direct"][key]
                    for key in ("ttft_p50_ms", "ttft_p99_ms", "e2el_p50_ms", "e2el_p99_ms")}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-prompts", type=int, default=96)
    parser.add_argument("--num-groups", type=int, default=16)
    parser.add_argument("--prefix-len", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--max-concurrency", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--serve-arg", dest="serve_args", action="append", default=[],
                        help="extra `serval serve` argument, repeatable (e.g. --serve-arg=--model=/path)")
    parser.add_argument("--overhead-requests", type=int, default=300)
    parser.add_argument("--capacity-requests", type=int, default=2000)
    parser.add_argument("--skip-cache", action="store_true", help="only the overhead and capacity parts")
    parser.add_argument("--json", default="results/router_bench.json")
    options = parser.parse_args()

    policies = [] if options.skip_cache else [run_policy(policy, options) for policy in ("round_robin", "cache_aware")]
    overhead = run_overhead(options)

    out = sys.stdout
    if policies:
        out.write(f"\nshared-prefix: {options.num_prompts} prompts, {options.num_groups} groups x "
                  f"{options.prefix_len}-token "
                  f"prefix + {options.input_len}-token question, {options.output_len} output tokens, "
                  f"{options.max_concurrency} in flight, 2 replicas\n")
        out.write(f"{'policy':<13}{'hit rate':>9}{'prefilled':>10}{'split (req)':>13}{'req/s':>7}{'tok/s':>7}"
                  f"{'TTFT p50':>9}{'TTFT p99':>9}{'failed':>7}\n")
        for row in policies:
            split = "/".join(f"{count:.0f}" for count in row["requests_per_replica"])
            out.write(f"{row['policy']:<13}{row['prefix_cache_hit_rate']:>9.1%}{row['prefill_tokens_computed']:>10.0f}"
                      f"{split:>13}{row['request_throughput']:>7.2f}{row['total_token_throughput']:>7.0f}"
                      f"{row['ttft_p50_ms']:>9.0f}{row['ttft_p99_ms']:>9.0f}{row['failed']:>7}\n")
    out.write("\nrouter overhead (stub backend, 1 request in flight; ms) and capacity (32 in flight)\n")
    out.write(f"{'path':<8}{'TTFT p50':>10}{'TTFT p99':>10}{'E2E p50':>10}{'E2E p99':>10}{'req/s @32':>11}\n")
    for name in ("direct", "router"):
        row = overhead[name]
        out.write(f"{name:<8}{row['ttft_p50_ms']:>10.2f}{row['ttft_p99_ms']:>10.2f}{row['e2el_p50_ms']:>10.2f}"
                  f"{row['e2el_p99_ms']:>10.2f}{row['requests_per_s_at_32_in_flight']:>11.0f}\n")
    added = overhead["added"]
    out.write(f"{'added':<8}{added['ttft_p50_ms']:>10.2f}{added['ttft_p99_ms']:>10.2f}{added['e2el_p50_ms']:>10.2f}"
              f"{added['e2el_p99_ms']:>10.2f}\n")
    result = {"benchmark": "router", "machine": f"{platform.machine()} {os.cpu_count()} cores",
              "options": vars(options), "policies": policies, "overhead": overhead}
    os.makedirs(os.path.dirname(options.json) or ".", exist_ok=True)
    with open(options.json, "w") as handle:
        json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
