"""Server overhead on CPU: the default model through `serval serve` (HTTP, streaming) versus the same engine
without HTTP (AsyncEngine in this process), on the same chat prompts at the same concurrency.

Both paths send --num-prompts chat prompts at once, at most --concurrency in flight, each generating exactly
--max-tokens tokens (temperature 0, EOS ignored), with the same --max-num-seqs. The server is started and
warmed up before anything is timed, and both paths get the same warm-up. Runs alternate in pairs (offline then
HTTP, HTTP then offline, ...) so that other work on a shared machine hits both alike. Both paths are timed with
the load generator's definitions (serval.bench.metrics): TTFT is the first chunk with text; end-to-end time
runs from the first request sent to the last one finished. Per-request latencies are pooled over repeats,
end-to-end time is the median over repeats, and the HTTP overhead is the median over pairs of
(HTTP end-to-end - offline end-to-end) / HTTP end-to-end.

The server's own TTFT and end-to-end histograms (/metrics, engine timestamps) split the HTTP path's latency
into time inside the engine and time in HTTP, SSE and the client; CPU seconds of the server and client
processes, and of the server's event-loop thread alone (uvicorn: HTTP, chat template, SSE; the engine and
torch run on other threads), say where the cycles went: measures that other work on the machine barely moves.

    python benchmarks/server_overhead.py [--num-prompts 16] [--concurrency 16] [--max-tokens 64] [--repeats 3] \
        [--max-num-seqs 256] [--output results/server_overhead.json]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import torch

from serval import AsyncEngine, SamplingParams
from serval.bench.endpoints import Endpoint
from serval.bench.loadgen import LoadConfig, run_endpoint
from serval.bench.metrics import RequestResult, stats_ms, summarize
from serval.bench.workloads import BenchRequest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_offline import conversations, write_summary  # noqa: E402  (the offline benchmark's 32 essay prompts)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- offline: AsyncEngine in this process
def chat_prompts(engine: AsyncEngine, convs: list[list[dict]]) -> list[dict]:
    """What the server's chat endpoint builds from the same messages (serval.server.admission.chat_prompt)."""
    prompts = []
    for conversation in convs:
        text = engine.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        prompts.append({"prompt": text, "prompt_token_ids": engine.tokenizer.encode(text, add_special_tokens=False)})
    return prompts


async def _offline_one(engine: AsyncEngine, prompt: dict, params: SamplingParams, origin: float,
                       slots: asyncio.Semaphore, result: RequestResult) -> None:
    async with slots:
        result.sent = time.perf_counter() - origin
        async for output in engine.generate(prompt, params):
            if result.ttft is None and output.outputs[0].text:
                result.ttft = time.perf_counter() - origin - result.sent
        result.end = time.perf_counter() - origin
        result.prompt_tokens = len(output.prompt_token_ids)
        result.output_tokens = len(output.outputs[0].token_ids)
        result.output_text = output.outputs[0].text


async def _offline_run(engine: AsyncEngine, prompts: list[dict], params: SamplingParams,
                       concurrency: int) -> list[RequestResult]:
    slots = asyncio.Semaphore(concurrency)
    results = [RequestResult(index=i, scheduled=0.0) for i in range(len(prompts))]
    origin = time.perf_counter()
    await asyncio.gather(*(_offline_one(engine, p, params, origin, slots, r) for p, r in zip(prompts, results)))
    return results


def run_offline(engine: AsyncEngine, prompts: list[dict], max_tokens: int, concurrency: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    cpu = time.process_time()
    results = asyncio.run(_offline_run(engine, prompts, params, concurrency))
    return {"results": results, "cpu_s": {"engine_process": time.process_time() - cpu}}


# ---------------------------------------------------------------- HTTP: a real `serval serve` subprocess
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python -m serval.cli serve` (default model, default flags) on a free loopback port."""

    def __init__(self, max_num_seqs: int, log_path: str) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(log_path, "w")
        command = [sys.executable, "-m", "serval.cli", "serve", "--host", "127.0.0.1",
                   "--port", self.url.rsplit(":", 1)[1], "--max-num-seqs", str(max_num_seqs)]
        started = time.perf_counter()
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serval serve exited with {self.process.returncode}; see {log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        else:
            raise RuntimeError(f"serval serve did not answer /health within 300 s; see {log_path}")
        self.load_s = time.perf_counter() - started
        self.model = httpx.get(self.url + "/v1/models", timeout=10).json()["data"][0]["id"]

    def cpu_s(self, stat: str = "stat") -> float:
        """CPU seconds of the whole process, or with stat=f"task/{pid}/stat" of its main thread alone: uvicorn's
        event loop (HTTP parsing, chat template, SSE); the engine and torch run on other threads."""
        with open(f"/proc/{self.process.pid}/{stat}") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime

    def event_loop_cpu_s(self) -> float:
        return self.cpu_s(f"task/{self.process.pid}/stat")

    def engine_histograms(self) -> dict[str, float]:
        """Sums and counts of the server's engine-timed TTFT and end-to-end histograms."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        values = {}
        for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
            for part in ("sum", "count"):
                match = re.search(rf"^serval:{name}_{part}{{[^}}]*}} (\S+)$", text, re.MULTILINE)
                values[f"{name}_{part}"] = float(match.group(1)) if match else 0.0
        return values

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def run_http(server: Server, convs: list[list[dict]], max_tokens: int, concurrency: int) -> dict:
    endpoint = Endpoint("serval", server.url, server.model, api="chat")
    workload = [BenchRequest(user=c[0]["content"], output_len=max_tokens, prompt_len=0) for c in convs]
    config = LoadConfig(max_concurrency=concurrency, progress=False, ignore_eos=True)
    before = server.engine_histograms()
    server_cpu, loop_cpu, client_cpu = server.cpu_s(), server.event_loop_cpu_s(), time.process_time()
    results = run_endpoint(endpoint, workload, config, None)
    cpu = {"server_process": server.cpu_s() - server_cpu, "client_process": time.process_time() - client_cpu}
    event_loop_cpu_s = server.event_loop_cpu_s() - loop_cpu
    after = server.engine_histograms()
    delta = {key: after[key] - before[key] for key in after}
    count = delta["time_to_first_token_seconds_count"] or 1.0
    engine = {"ttft_mean_ms": 1000.0 * delta["time_to_first_token_seconds_sum"] / count,
              "e2el_mean_ms": 1000.0 * delta["e2e_request_latency_seconds_sum"] / count}
    return {"results": results, "cpu_s": cpu, "server_engine": engine, "event_loop_cpu_s": event_loop_cpu_s}


# ---------------------------------------------------------------- summary
def summarize_runs(runs: list[dict]) -> dict:
    results = [r for run in runs for r in run["results"]]
    failed = [r for r in results if not r.success]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, e.g. {failed[0].error_type}: {failed[0].error}")
    per_run = [summarize(run["results"]) for run in runs]
    wall = statistics.median(s["duration_s"] for s in per_run)
    output_tokens = per_run[0]["total_output_tokens"]
    summary = {"ttft_ms": stats_ms([r.ttft for r in results]), "e2el_ms": stats_ms([r.e2el for r in results]),
               "tpot_ms": stats_ms([r.tpot for r in results if r.tpot is not None]),
               "e2e_s_per_run": [s["duration_s"] for s in per_run], "e2e_s": wall,
               "output_tokens": output_tokens, "prompt_tokens": per_run[0]["total_input_tokens"],
               "output_tokens_per_s": output_tokens / wall,
               "cpu_s": {key: statistics.median(run["cpu_s"][key] for run in runs) for key in runs[0]["cpu_s"]}}
    summary["ttft_s_per_run"] = [sorted(round(r.ttft, 3) for r in run["results"]) for run in runs]
    if "server_engine" in runs[0]:
        summary["server_engine"] = {key: statistics.mean(run["server_engine"][key] for run in runs)
                                    for key in runs[0]["server_engine"]}
        summary["event_loop_cpu_s"] = statistics.median(run["event_loop_cpu_s"] for run in runs)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=None, help="streams in flight (default: --num-prompts)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed offline/HTTP pairs, interleaved")
    parser.add_argument("--warmup-tokens", type=int, default=8)
    parser.add_argument("--max-num-seqs", type=int, default=256, help="both engines (serval serve's default)")
    parser.add_argument("--output", default="results/server_overhead.json")
    args = parser.parse_args()
    concurrency = args.concurrency or args.num_prompts
    convs = conversations(args.num_prompts)

    started = time.perf_counter()
    engine = AsyncEngine.from_engine_args(max_num_seqs=args.max_num_seqs)
    offline_load_s = time.perf_counter() - started
    prompts = chat_prompts(engine, convs)
    log_path = os.path.join(tempfile.gettempdir(), f"serval-server-overhead-{os.getpid()}.log")
    server = Server(args.max_num_seqs, log_path)
    try:
        run_offline(engine, prompts, args.warmup_tokens, concurrency)  # warm-up, untimed, both paths alike
        run_http(server, convs, args.warmup_tokens, concurrency)
        offline_runs, http_runs = [], []
        for repeat in range(args.repeats):
            offline_first = repeat % 2 == 0  # ABBA order: neither path always runs first in its pair
            if offline_first:
                offline_runs.append(run_offline(engine, prompts, args.max_tokens, concurrency))
            http_runs.append(run_http(server, convs, args.max_tokens, concurrency))
            if not offline_first:
                offline_runs.append(run_offline(engine, prompts, args.max_tokens, concurrency))
            walls = [summarize(runs[-1]["results"])["duration_s"] for runs in (offline_runs, http_runs)]
            print(f"repeat {repeat + 1}/{args.repeats}: offline {walls[0]:.2f} s, HTTP {walls[1]:.2f} s", flush=True)
    finally:
        server.close()
        engine.shutdown()

    offline, http = summarize_runs(offline_runs), summarize_runs(http_runs)
    same_prompts = offline["prompt_tokens"] == http["prompt_tokens"]
    same_text = sum(a.output_text == b.output_text
                    for a, b in zip(offline_runs[-1]["results"], http_runs[-1]["results"]))
    # Pairs ran back to back, so the median of per-pair overheads cancels most of a shared machine's drift.
    per_repeat = [(h - o) / h for o, h in zip(offline["e2e_s_per_run"], http["e2e_s_per_run"])]
    overhead = statistics.median(per_repeat)
    loop_share = http["event_loop_cpu_s"] / http["e2e_s"]
    http_cpu, offline_cpu = sum(http["cpu_s"].values()), offline["cpu_s"]["engine_process"]

    print(f"\nServer overhead on CPU: default model (SmolLM2-135M-Instruct Q4_1 GGUF), {args.num_prompts} chat prompts "
          f"x {args.max_tokens} output tokens, {concurrency} concurrent streams, max_num_seqs {args.max_num_seqs}, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, {args.repeats} repeats")
    print(f"{'path':<10}{'TTFT mean':>10}{'p50':>8}{'p99':>8}{'E2EL mean':>11}{'TPOT':>7}{'E2E s':>8}"
          f"{'out tok/s':>11}{'CPU s':>8}")
    for name, s in (("offline", offline), ("HTTP", http)):
        print(f"{name:<10}{s['ttft_ms']['mean']:>10.0f}{s['ttft_ms']['median']:>8.0f}{s['ttft_ms']['p99']:>8.0f}"
              f"{s['e2el_ms']['mean']:>11.0f}{s['tpot_ms']['mean']:>7.0f}{s['e2e_s']:>8.2f}"
              f"{s['output_tokens_per_s']:>11.1f}{sum(s['cpu_s'].values()):>8.1f}")
    print("(latencies in ms; E2E s = first request sent to last finished, median over repeats)")
    engine_side = http["server_engine"]
    print(f"HTTP path split: engine-timed TTFT {engine_side['ttft_mean_ms']:.0f} ms and E2EL "
          f"{engine_side['e2el_mean_ms']:.0f} ms inside the server (client sees {http['ttft_ms']['mean']:.0f} / "
          f"{http['e2el_ms']['mean']:.0f} ms); "
          f"CPU s server {http['cpu_s']['server_process']:.1f} (event-loop thread {http['event_loop_cpu_s']:.2f}), "
          f"client {http['cpu_s']['client_process']:.2f}; offline {offline_cpu:.1f}")
    print(f"HTTP overhead: {100 * overhead:.1f}% of end-to-end time, median of pairs (per pair: "
          f"{', '.join(f'{100 * p:.1f}%' for p in per_repeat)}); "
          f"target < 5%: {'met' if overhead < 0.05 else 'NOT met'}")
    print(f"views a shared machine barely moves: event-loop CPU = {100 * loop_share:.1f}% of HTTP end-to-end "
          f"time; CPU s HTTP (server + client) vs offline {100 * (http_cpu - offline_cpu) / http_cpu:+.1f}%; "
          f"stream delivery "
          f"(client minus engine-timed) TTFT {http['ttft_ms']['mean'] - engine_side['ttft_mean_ms']:+.0f} ms, "
          f"E2EL {http['e2el_ms']['mean'] - engine_side['e2el_mean_ms']:+.0f} ms")
    print(f"same prompt tokens: {same_prompts} ({offline['prompt_tokens']}); "
          f"identical output text in the last repeat: {same_text}/{args.num_prompts}")
    summary = {"benchmark": "server_overhead", "machine": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "num_prompts": args.num_prompts, "concurrency": concurrency, "max_tokens": args.max_tokens,
               "max_num_seqs": args.max_num_seqs, "repeats": args.repeats, "load_s": {
                   "offline": offline_load_s, "server": server.load_s},
               "offline": offline, "http": http, "http_overhead": overhead, "http_overhead_per_repeat": per_repeat,
               "event_loop_cpu_share_of_e2e": loop_share, "cpu_overhead": (http_cpu - offline_cpu) / http_cpu,
               "target_met": overhead < 0.05, "same_prompt_tokens": same_prompts, "identical_outputs": same_text}
    write_summary(args.output, summary)


if __name__ == "__main__":
    main()
