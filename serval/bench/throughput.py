"""`serval bench throughput`: offline engine throughput (no HTTP), vLLM benchmark_throughput's numbers.

All prompts go to `LLM.generate` at once with ignore_eos, so every request produces exactly its output
length; elapsed = wall time of that call. Chat turns are sent as independent prompts (offline there are no
replies to build a history from).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from serval.bench.tokenizer import BenchTokenizer, load_tokenizer
from serval.bench.workloads import BenchRequest, build_workload


@dataclass
class ThroughputResult:
    num_requests: int
    elapsed_s: float
    total_input_tokens: int
    total_output_tokens: int

    @property
    def requests_per_second(self) -> float:
        return self.num_requests / self.elapsed_s

    @property
    def output_tokens_per_second(self) -> float:
        return self.total_output_tokens / self.elapsed_s

    @property
    def total_tokens_per_second(self) -> float:
        return (self.total_input_tokens + self.total_output_tokens) / self.elapsed_s

    def to_json(self) -> dict:
        return {"num_requests": self.num_requests, "elapsed_s": self.elapsed_s,
                "total_input_tokens": self.total_input_tokens, "total_output_tokens": self.total_output_tokens,
                "requests_per_second": self.requests_per_second,
                "output_tokens_per_second": self.output_tokens_per_second,
                "total_tokens_per_second": self.total_tokens_per_second}


def prompt_ids(request: BenchRequest, tokenizer: BenchTokenizer) -> list[int]:
    if request.messages:
        text = "\n\n".join(str(m.get("content", "")) for m in request.messages)
    else:
        text = f"{request.system}\n\n{request.user}" if request.system else request.user
    return tokenizer.encode(text) or [0]


def run_offline(llm, workload: list[BenchRequest], tokenizer: BenchTokenizer) -> ThroughputResult:
    from serval import SamplingParams
    prompts = [{"prompt_token_ids": prompt_ids(request, tokenizer)} for request in workload]
    params = [SamplingParams(max_tokens=request.output_len, ignore_eos=True, temperature=0.0) for request in workload]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return ThroughputResult(num_requests=len(outputs), elapsed_s=elapsed,
                            total_input_tokens=sum(len(o.prompt_token_ids) for o in outputs),
                            total_output_tokens=sum(len(o.outputs[0].token_ids) for o in outputs))


def engine_args(args) -> dict:
    out = {key: getattr(args, key) for key in ("load_format", "max_model_len", "max_num_seqs", "max_num_batched_tokens")
           if getattr(args, key, None) is not None}
    for item in args.engine_arg:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"invalid --engine-arg: {item!r}; allowed: KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def bench_throughput(args) -> dict:
    from serval import LLM
    from serval.bench.cli import workload_config
    llm = LLM(model=args.model, **engine_args(args))
    engine_tokenizer = None if args.tokenizer else llm.get_tokenizer()
    if engine_tokenizer is None and not args.tokenizer:
        raise ValueError("invalid arguments: the engine has no tokenizer (skip_tokenizer_init); pass --tokenizer")
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else BenchTokenizer("engine", engine_tokenizer)
    workload = build_workload(workload_config(args), tokenizer)
    result = {"workload": args.workload, "model": args.model or "default", "engine_args": engine_args(args),
              **run_offline(llm, workload, tokenizer).to_json()}
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


def format_throughput(result: dict) -> str:
    return (f"Throughput: {result['requests_per_second']:.2f} requests/s, "
            f"{result['total_tokens_per_second']:.1f} total tokens/s, "
            f"{result['output_tokens_per_second']:.1f} output tokens/s "
            f"({result['num_requests']} requests, {result['total_input_tokens']} input + "
            f"{result['total_output_tokens']} output tokens in {result['elapsed_s']:.2f} s)")
