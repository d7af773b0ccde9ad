"""Where a batch-1 decode token's GPU time goes, kernel by kernel. CUDA graph replays hide their kernels from the
profiler, so the engine runs eagerly here (`enforce_eager=True`): the kernels are the same ones a replayed graph
runs, and their summed device time is what the graph's step costs when the GPU, not the host, is the bound
(compare `total device ms per token` with the graph-replayed step of gpu_suite.py). Dummy weights.

    PYTHONPATH=/tmp/site:. python benchmarks/decode_profile.py --model benchmarks/configs/qwen3-30b-a3b --out $OUT/prof
    PYTHONPATH=/tmp/site:. python benchmarks/decode_profile.py --quantization fp8 --kv-cache-dtype fp8 --out $OUT/prof
    python benchmarks/decode_profile.py --tiny --out /tmp/prof        # CPU smoke run (a two-layer Llama)

--prefill: one prompt of --prompt-len tokens, one output token, instead of a decode: the step a serving run's
prefill takes (above the mixed-graph sizes every such step runs eagerly, as here). Prints the step's wall time
(no profiler, best of 5) beside its summed kernel time, and the host-side runtime calls (kernel launches, copies,
synchronizations) with their CPU time: a wall time well above the kernel time with a synchronization inside the
step means the host's launches were not hidden behind the GPU.

    PYTHONPATH=/tmp/site:. python benchmarks/decode_profile.py --prefill --prompt-len 1024 --out $OUT/prefill

Prints the eager tok/s, the device time per token and the kernels sorted by their share; writes OUT/profile.txt
and OUT/decode_profile.json (the top kernels with calls and microseconds per token).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from serval import LLM, SamplingParams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="benchmarks/configs/llama-3-8b")
    parser.add_argument("--quantization", default=None, choices=[None, "fp8"])
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--tokens", type=int, default=64, help="decode tokens profiled (after as many untimed)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--tiny", action="store_true", help="a two-layer Llama on the CPU")
    parser.add_argument("--prefill", action="store_true", help="profile a prefill step instead (see above)")
    parser.add_argument("--out", default="results/decode_profile")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    model = args.model
    if args.tiny:
        from gpu_suite import write_tiny_model
        model = write_tiny_model(args.out)
    cuda = torch.cuda.is_available() and not args.tiny
    llm = LLM(model=model, load_format="dummy", dtype="bfloat16", max_model_len=2048, max_num_seqs=8,
              gpu_memory_utilization=0.9, enforce_eager=True, quantization=args.quantization,
              kv_cache_dtype=args.kv_cache_dtype, device="cuda" if cuda else "cpu", skip_tokenizer_init=True)
    tokens = 1 if args.prefill else args.tokens  # what the per-token figures divide by
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    prompt = [{"prompt_token_ids": list(range(100, 100 + args.prompt_len))}]

    def run() -> float:
        llm.engine.kv_cache.reset_prefix_cache()
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        llm.generate(prompt, params, use_tqdm=False)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    run()
    if args.prefill:
        return profile_prefill(llm, run, prompt, params, cuda, args)
    eager_tok_s = args.tokens / run()
    llm.engine.kv_cache.reset_prefix_cache()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        llm.generate(prompt, params, use_tqdm=False)
    events = prof.key_averages()
    time_of = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total_us = sum(time_of(e) for e in events)
    # Kernels only on a GPU (operators' self device time is their kernels'); operators on the CPU.
    rows = sorted((e for e in events if time_of(e) > 0 and (not cuda or e.device_type.name == "CUDA")),
                  key=time_of, reverse=True)
    top = [{"name": e.key, "calls_per_token": e.count / args.tokens, "us_per_token": time_of(e) / args.tokens,
            "share": time_of(e) / total_us} for e in rows[:30]]
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=30, max_name_column_width=70)
    with open(os.path.join(args.out, "profile.txt"), "w") as handle:
        handle.write(table)
    result = {"model": args.model if not args.tiny else "tiny", "quantization": args.quantization,
              "kv_cache_dtype": args.kv_cache_dtype, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
              "tokens": args.tokens, "eager_tok_s": eager_tok_s, "device_ms_per_token": total_us / 1e3 / args.tokens,
              "kernels_per_token": sum(e.count for e in rows) / args.tokens, "top": top}
    with open(os.path.join(args.out, "decode_profile.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    print(f"{result['model']} ({args.quantization or 'bf16'}, kv {args.kv_cache_dtype}) on {result['device']}: "
          f"eager {eager_tok_s:.1f} tok/s, {result['device_ms_per_token']:.3f} ms of "
          f"{'kernel' if cuda else 'CPU'} time a token, {result['kernels_per_token']:.0f} "
          f"{'kernels' if cuda else 'operator calls'} a token")
    print(f"{'kernel' if cuda else 'operator':70} {'calls/token':>11} {'us/token':>9} {'share':>6}")
    for row in top[:20]:
        print(f"{row['name'][:70]:70} {row['calls_per_token']:11.1f} {row['us_per_token']:9.1f} {row['share']:6.1%}")


RUNTIME_CALLS = ("LaunchKernel", "Synchronize", "Memcpy", "Memset", "EventRecord", "StreamWait")


def _is_runtime_call(name: str) -> bool:
    return any(part in name for part in RUNTIME_CALLS)


def _by_cpu_time(events) -> list[dict]:
    rows = [{"name": e.key, "calls": e.count, "cpu_ms": e.self_cpu_time_total / 1e3} for e in events]
    return sorted(rows, key=lambda row: row["cpu_ms"], reverse=True)


def profile_prefill(llm, run, prompt, params, cuda: bool, args) -> None:
    wall_ms = min(run() for _ in range(5)) * 1e3
    llm.engine.kv_cache.reset_prefix_cache()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        llm.generate(prompt, params, use_tqdm=False)
    events = prof.key_averages()
    kernel_ms = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e3 if cuda else 0.0
    runtime = _by_cpu_time(e for e in events if _is_runtime_call(e.key))
    operators = _by_cpu_time(e for e in events if e.device_type.name == "CPU" and not _is_runtime_call(e.key))[:25]
    result = {"model": args.model if not args.tiny else "tiny", "quantization": args.quantization,
              "kv_cache_dtype": args.kv_cache_dtype, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
              "prompt_len": args.prompt_len, "wall_ms": wall_ms, "kernel_ms": kernel_ms,
              "runtime_calls": runtime, "operators_by_self_cpu": operators}
    with open(os.path.join(args.out, "prefill_profile.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    print(f"{result['model']} ({args.quantization or 'bf16'}, kv {args.kv_cache_dtype}) on {result['device']}: "
          f"a {args.prompt_len}-token prefill step {wall_ms:.2f} ms wall (best of 5, no profiler), "
          f"{kernel_ms:.2f} ms of kernels")
    print(f"{'runtime call':50} {'calls':>6} {'CPU ms':>8}")
    for row in runtime[:12]:
        print(f"{row['name'][:50]:50} {row['calls']:6d} {row['cpu_ms']:8.2f}")
    print(f"{'operator (self CPU)':50} {'calls':>6} {'CPU ms':>8}")
    for row in operators[:20]:
        print(f"{row['name'][:50]:50} {row['calls']:6d} {row['cpu_ms']:8.2f}")


if __name__ == "__main__":
    main()
