"""`serval bench serve` and `serval bench throughput`: add_bench_parser registers them on a subparsers object."""
from __future__ import annotations

import argparse
import logging
import math
import sys

logger = logging.getLogger(__name__)


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    from serval.bench.workloads import WORKLOADS
    group = parser.add_argument_group("workload")
    group.add_argument("--workload", "--dataset-name", dest="workload", choices=WORKLOADS, default="random")
    group.add_argument("--dataset-path", default=None, help="jsonl: lines of {prompt|messages, output_len}")
    group.add_argument("--num-prompts", type=int, default=100)
    group.add_argument("--input-len", "--random-input-len", dest="input_len", type=int, default=None,
                       help="prompt tokens (per user turn for chat, the question for shared-prefix); "
                            "default 1024, long-context 32000, shared-prefix/chat 128")
    group.add_argument("--output-len", "--random-output-len", dest="output_len", type=int, default=None,
                       help="tokens to generate (default 128)")
    group.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths uniform in [L(1-r), L(1+r)]")
    group.add_argument("--prefix-len", type=int, default=1024, help="shared-prefix: system prompt tokens")
    group.add_argument("--num-groups", type=int, default=4, help="shared-prefix: distinct system prompts")
    group.add_argument("--chat-turns", type=int, default=3, help="chat: turns per conversation")
    group.add_argument("--tokenizer", default=None,
                       help="llama3, qwen3, smollm2 (default), a tokenizer.json, a .gguf or a model directory")
    group.add_argument("--seed", type=int, default=0)


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("endpoints")
    target.add_argument("--base-url", action="append", default=None,
                        help="OpenAI base URL, repeatable; NAME=URL names it (default names endpoint0, ...)")
    target.add_argument("--endpoints", default=None, help="YAML file: endpoints: [{name, base_url, model, api, ...}]")
    target.add_argument("--model", default=None, help="model name sent in requests")
    target.add_argument("--api", choices=("completions", "chat"), default="completions")
    target.add_argument("--no-ignore-eos", action="store_true", help="don't send ignore_eos (strict OpenAI servers)")
    tools = parser.add_argument_group("tools (chat)")
    tools.add_argument("--tools", dest="tools_file", default=None, metavar="FILE.json",
                       help="function tools sent with every chat request (a JSON list, or one under 'tools')")
    tools.add_argument("--tool-workload", action="store_true",
                       help="send the built-in tools (weather, flights, calendar, orders, time)")
    tools.add_argument("--tool-choice", default=None,
                       help="none, auto (default with tools), required, or a tool's name (a named function)")
    load = parser.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=math.inf, help="req/s (default inf: all at once)")
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 is Poisson, <1 burstier")
    load.add_argument("--max-concurrency", type=int, default=None)
    load.add_argument("--duration", type=float, default=None, help="seconds of arrivals, cycling the workload")
    load.add_argument("--num-warmups", type=int, default=0)
    load.add_argument("--sweep", default=None, help="comma-separated rates, e.g. 1,2,4,8; finds the highest meeting --slo")
    load.add_argument("--reuse-prompts", action="store_true",
                      help="every rate of --sweep sends the same prompts (by default each draws its own, seed + i: "
                           "repeated prompts would hit the server's prefix cache)")
    load.add_argument("--request-timeout", type=float, default=600.0)
    slo = parser.add_argument_group("SLO and cost")
    slo.add_argument("--slo", "--goodput", dest="slo", default=None, help="ttft=MS,tpot=MS,e2e=MS")
    slo.add_argument("--slo-attainment", type=float, default=0.95, help="share of requests that must meet --slo")
    slo.add_argument("--gpu-hour-price", type=float, default=None, help="$ per GPU-hour")
    slo.add_argument("--num-gpus", type=int, default=1)
    output = parser.add_argument_group("output")
    output.add_argument("--result-dir", default=None, help="writes summary.json, requests.jsonl, report.md, PNGs")
    output.add_argument("--no-plots", action="store_true")
    output.add_argument("--disable-tqdm", action="store_true")


def workload_config(args):
    from serval.bench.workloads import WorkloadConfig
    num_prompts = args.num_prompts
    if args.workload == "chat" and num_prompts % args.chat_turns:
        num_prompts += args.chat_turns - num_prompts % args.chat_turns  # whole conversations
    return WorkloadConfig(name=args.workload, num_prompts=num_prompts, input_len=args.input_len,
                          output_len=args.output_len, range_ratio=args.random_range_ratio, seed=args.seed,
                          prefix_len=args.prefix_len, num_groups=args.num_groups, chat_turns=args.chat_turns,
                          jsonl_path=args.dataset_path)


def run_serve(args) -> int:
    from serval.bench.endpoints import load_endpoints
    from serval.bench.loadgen import LoadConfig
    from serval.bench.metrics import parse_slo
    from serval.bench.report import terminal_table, write_results
    from serval.bench.serve import ServeConfig, bench_serve, warmups_per_rate, workloads_per_rate
    from serval.bench.tokenizer import load_tokenizer
    from serval.bench.tools import tool_options

    endpoints = load_endpoints(args.base_url, args.endpoints, args.model, args.api)
    tools = tool_options(args.tools_file, args.tool_workload, args.tool_choice, args.api)
    rates = [float(rate) for rate in args.sweep.split(",")] if args.sweep else [args.request_rate]
    load = LoadConfig(request_rate=rates[0], burstiness=args.burstiness, max_concurrency=args.max_concurrency,
                      duration=args.duration, num_warmups=args.num_warmups, timeout=args.request_timeout,
                      ignore_eos=not args.no_ignore_eos, seed=args.seed, progress=not args.disable_tqdm,
                      tools=tools)
    config = ServeConfig(workload=workload_config(args), load=load, rates=rates, slo=parse_slo(args.slo),
                         slo_attainment=args.slo_attainment, gpu_hour_price=args.gpu_hour_price,
                         num_gpus=args.num_gpus, tokenizer=args.tokenizer,
                         reuse_prompts=args.reuse_prompts)
    tokenizer = load_tokenizer(args.tokenizer)
    workloads = workloads_per_rate(config, tokenizer)
    report, results = bench_serve(endpoints, workloads, config, tokenizer, warmups_per_rate(config, tokenizer))
    if args.result_dir:
        write_results(report, results, args.result_dir, make_plots=not args.no_plots)
    sys.stdout.write(terminal_table(report) + "\n")
    return 0


def run_throughput(args) -> int:
    from serval.bench.throughput import bench_throughput, format_throughput
    result = bench_throughput(args)
    sys.stdout.write(format_throughput(result) + "\n")
    return 0


def _guarded(run):
    def call(args) -> int:
        try:
            return run(args)
        except ValueError as error:  # bad input: say what to change, no traceback
            sys.stderr.write(f"error: {error}\n")
            return 2
    return call


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    bench = subparsers.add_parser("bench", help="benchmark serving endpoints or the offline engine")
    commands = bench.add_subparsers(dest="bench_command", required=True)
    serve = commands.add_parser("serve", help="load-test OpenAI-compatible endpoints side by side")
    add_workload_args(serve)
    add_serve_args(serve)
    serve.set_defaults(func=_guarded(run_serve))
    throughput = commands.add_parser("throughput", help="offline engine throughput (no HTTP)")
    add_workload_args(throughput)
    throughput.add_argument("--model", default=None, help="model path (default: Serval's default model)")
    throughput.add_argument("--load-format", default=None, help="e.g. dummy for random weights")
    throughput.add_argument("--max-model-len", type=int, default=None)
    throughput.add_argument("--max-num-seqs", type=int, default=None)
    throughput.add_argument("--max-num-batched-tokens", type=int, default=None)
    throughput.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                            help="any other engine argument (vLLM name), repeatable")
    throughput.add_argument("--output-json", default=None)
    throughput.set_defaults(func=_guarded(run_throughput))
    return bench


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(prog="serval")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)
