"""The tool-call grammar's cost inside the engine, without a server: decode-step time of the same batch with and
without `tool_choice="required"`'s constraint, measured on LLMEngine directly (no HTTP, no event loop sharing the
GIL). Prints a table and writes JSON. Issue 15's server benchmark (tool_bench.py) measures the whole path; this
one isolates what the constrained sampler itself costs.

    PYTHONPATH=/tmp/site:. python benchmarks/tool_engine_bench.py --out results/tool_engine   # one GPU
    python benchmarks/tool_engine_bench.py --tiny --out /tmp/tool_engine                      # CPU: tiny shape

The Llama-3-8B shape with dummy weights and the Llama 3 tokenizer (tool_bench.write_model_dir), `--batch`
requests of `--prompt-len` random token ids, `--output-len` tokens each, EOS ignored, temperature 1. The
constraint is the grammar `tool_choice="required"` builds over the five tools of `serval bench serve
--tool-workload` in the llama3_json format. Runs, in order: a constrained warm-up, then none and required
alternately (--repeats times); only steps with every request decoding are timed (prefill untimed).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))

import tool_bench  # noqa: E402

from serval.bench.tools import BUILTIN_TOOLS  # noqa: E402
from serval.engine.engine import LLMEngine  # noqa: E402
from serval.openai.tool_grammar import tool_call_grammar  # noqa: E402
from serval.sampling_params import SamplingParams, StructuredOutputsParams  # noqa: E402


def decode_step_times(engine: LLMEngine, prompts: list[list[int]], output_len: int,
                      constraint: StructuredOutputsParams | None, tag: str) -> list[float]:
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=1.0, structured_outputs=constraint)
    for index, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{index}", {"prompt_token_ids": prompt}, params)
    times = []
    while engine.has_unfinished_requests():
        decoding = engine.scheduler.num_waiting == 0
        started = time.perf_counter()
        engine.step()
        if decoding:
            times.append(time.perf_counter() - started)
    return times


def summary(times: list[float]) -> dict:
    return {"steps": len(times), "mean_ms": 1000 * statistics.fmean(times),
            "p50_ms": 1000 * statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/tool_engine")
    parser.add_argument("--tiny", action="store_true", help="CPU: a tiny Llama with the 128k vocabulary")
    parser.add_argument("--batch", type=int, default=None, help="requests decoding together (default 256; tiny 8)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 800; tiny 64)")
    parser.add_argument("--output-len", type=int, default=None, help="tokens per request (default 128; tiny 16)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    tool_bench.fill_size_defaults(args, {"batch": (256, 8), "prompt_len": (800, 64), "output_len": (128, 16)})
    os.makedirs(args.out, exist_ok=True)
    model_dir = tool_bench.write_model_dir(args.out, args.tiny)
    engine = LLMEngine.from_engine_args(model=model_dir, load_format="dummy", max_model_len=2048,
                                        max_num_seqs=max(args.batch, 8),
                                        **({"dtype": "float32"} if args.tiny else {}))
    grammar = tool_call_grammar("llama3_json", BUILTIN_TOOLS, "required",
                                added_tokens=engine.tokenizer.get_added_vocab())
    constraint = StructuredOutputsParams(grammar=grammar)
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 100000) for _ in range(args.prompt_len)] for _ in range(args.batch)]
    decode_step_times(engine, prompts, args.output_len, constraint, "warmup")
    runs: dict[str, list[float]] = {"none": [], "required": []}
    for repeat in range(args.repeats):
        for choice in runs:
            runs[choice] += decode_step_times(engine, prompts, args.output_len,
                                              constraint if choice == "required" else None, f"{choice}{repeat}")
    results = {choice: summary(times) for choice, times in runs.items()}
    overhead = 100.0 * (results["required"]["mean_ms"] / results["none"]["mean_ms"] - 1.0)
    report = {"benchmark": "tool_engine_bench", "device": str(engine.device),
              "device_name": tool_bench.device_name(args.tiny), "batch": args.batch,
              "prompt_len": args.prompt_len, "output_len": args.output_len, "repeats": args.repeats,
              "async_scheduling": engine.async_scheduling, "results": results,
              "required_overhead_pct": overhead}
    with open(os.path.join(args.out, "tool_engine_bench.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    lines = [f"Tool grammar in the engine: {report['device_name']}, {args.batch} requests, {args.prompt_len} in / "
             f"{args.output_len} out, async scheduling {engine.async_scheduling}",
             "tool_choice | decode steps | mean ms | p50 ms"]
    lines += [f"{choice:<11} | {row['steps']:>12} | {row['mean_ms']:7.2f} | {row['p50_ms']:6.2f}"
              for choice, row in results.items()]
    lines.append(f"required vs none: {overhead:+.1f}% mean decode step (goal < 5%)")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
