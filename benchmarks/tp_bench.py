"""Tensor parallelism: batch-1 decode against the per-GPU bandwidth roofline, and offline throughput, per model
shape and tensor_parallel_size; plus tensor_parallel_size=1 through the multi-process executor against today's
in-process engine (the cost of the parallel path itself).

Dummy weights (load_format="dummy") from a config.json written here: no checkpoint, no network. Each case runs in
a fresh subprocess (its own GPUs' memory, its own process group).

    cases    llama3-8b at tp 1/2/4, llama3-70b at tp 2/4 (those that fit the GPUs present), and llama3-8b tp=1
             with distributed_executor_backend=mp ("tp1-executor") next to tp=1 in-process ("tp1-engine"); every
             case with CUDA graphs and asynchronous scheduling, the engine's defaults (--enforce-eager: none), and
             each run with mixed prefill/decode graphs off and on (--cudagraph-mixed; --mixed-graphs picks), so the
             tp1 pair is compared like for like under both: the executor's ranks capture and replay the same
             mixed-step graphs as the in-process engine
    batch-1  one request, 32 prompt tokens: decode tok/s = (decode_tokens - 1) / (t(decode_tokens) - t(1));
             the roofline is HBM bandwidth / the weight bytes one GPU reads per token (rank 0's shard)
    offline  --num-prompts random-id prompts of --input-len, --output-len tokens each, all queued at once, timed
             after --warmup-passes untimed passes of the same prompts. The timed pass finds the prompts in the
             prefix cache, so its prefill steps differ from a first pass's (a chunk of each prompt's last block
             over a cached context). After one warm-up pass (the old default) it launches Triton kernel variants
             no earlier step had (seen in Triton's interpreter on the CPU), compiled inside the timed pass by the
             first case run and read from Triton's disk cache by the next: the suspect for tp1-engine (always run
             first) timing 1.28x below tp1-executor although both dispatch the same ops. Two passes (the default)
             make the last warm-up the timed pass's twin; "new kernels" (Triton variants first launched in the
             timed pass) and "compile s" (the seconds spent getting them) must read 0 for a fair row.

    PYTHONPATH=/tmp/site:. python benchmarks/tp_bench.py --output docs/results/tp_bench_h200.json
    PYTHONPATH=/tmp/site:. python benchmarks/tp_bench.py --cases tp1-engine tp1-executor   # one GPU: the tp1 pair
    # cases run in the order given, repeats allowed: the pair both ways round, and the old single warm-up pass
    PYTHONPATH=/tmp/site:. python benchmarks/tp_bench.py --cases tp1-engine tp1-executor tp1-engine --warmup-passes 1
    python benchmarks/tp_bench.py --tiny     # CPU, gloo, a 2-layer model: checks the script end to end
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = {  # transformers.LlamaConfig arguments
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024),
}


@dataclass
class Case:
    name: str
    shape: str
    tensor_parallel_size: int
    executor: str | None  # distributed_executor_backend
    cudagraph_mixed: bool = False  # mixed prefill/decode steps replayed from graphs (--cudagraph-mixed)


@dataclass
class CaseResult:
    name: str
    shape: str
    tensor_parallel_size: int
    executor: str
    # None where the case failed (error says why)
    weight_gib_per_gpu: float | None
    batch1_decode_tok_s: float | None
    roofline_tok_s: float | None
    roofline_fraction: float | None
    offline_output_tok_s: float | None
    offline_total_tok_s: float | None
    offline_seconds: float | None
    error: str | None = None
    # What the engine ran with: decode steps from CUDA graphs (every rank's, all-reduces inside), and decode step
    # N+1 queued while N runs. Both sides of the tp1 comparison must say the same.
    cuda_graphs: bool | None = None
    async_scheduling: bool | None = None
    cudagraph_mixed: bool = False  # asked for
    mixed_graphs: bool | None = None  # captured (never on a CPU)
    # The KV pool (blocks of the engine's block size): the offline rows of the tp1 pair are like for like only
    # when both hold the same.
    num_kv_blocks: int | None = None
    # Triton kernel variants the timed offline pass launched first (compiled, or read from Triton's disk cache if an
    # earlier case compiled them) and the seconds they took; None without Triton. Nonzero: the warm-up missed them.
    timed_new_kernels: int | None = None
    timed_compile_seconds: float | None = None


def executor_name(case: Case) -> str:
    return "in-process" if case.tensor_parallel_size == 1 and case.executor is None else "mp"


MIXED_SETTINGS = {"off": (False,), "on": (True,), "both": (False, True)}


def cases_for(args: argparse.Namespace, num_devices: int) -> list[Case]:
    if args.tiny:
        cases = [Case("tp1-engine", "tiny", 1, None), Case("tp1-executor", "tiny", 1, "mp"),
                 Case("tiny-tp2", "tiny", 2, None)]
    else:
        cases = [Case("tp1-engine", "llama3-8b", 1, None), Case("tp1-executor", "llama3-8b", 1, "mp")]
        cases += [Case(f"llama3-8b-tp{n}", "llama3-8b", n, None) for n in (2, 4) if n <= num_devices]
        cases += [Case(f"llama3-70b-tp{n}", "llama3-70b", n, None) for n in (2, 4) if n <= num_devices]
    if args.cases:  # in the order asked for, repeats kept: a pair run both ways round shows an order effect
        by_name = {case.name: case for case in cases}
        cases = [by_name[name] for name in args.cases if name in by_name]
    # Setting by setting, so that each tp1 pair runs back to back under the same one.
    return [dataclasses.replace(case, cudagraph_mixed=mixed) for mixed in MIXED_SETTINGS[args.mixed_graphs]
            for case in cases]


def write_config(directory: str, shape: str) -> str:
    import transformers
    path = os.path.join(directory, shape)
    if not os.path.isdir(path):
        config = transformers.LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2,
                                          tie_word_embeddings=False, torch_dtype="bfloat16")
        config.architectures = ["LlamaForCausalLM"]
        config.save_pretrained(path)
    return path


class KernelCompiles:
    """Counts the Triton kernel variants launched for the first time in this process (a miss of a kernel's
    in-memory cache: a compile, or a read of Triton's disk cache) and the seconds spent on them."""

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        try:
            from triton.runtime.jit import JITFunction
        except ImportError:
            self.available = False
            return
        self.available = hasattr(JITFunction, "_do_compile")
        if not self.available:
            return
        do_compile = JITFunction._do_compile

        def counted(function, *args, **kwargs):
            started = time.perf_counter()
            try:
                return do_compile(function, *args, **kwargs)
            finally:
                self.count += 1
                self.seconds += time.perf_counter() - started

        JITFunction._do_compile = counted

    def since(self, count: int, seconds: float) -> tuple[int | None, float | None]:
        if not self.available:
            return None, None
        return self.count - count, round(self.seconds - seconds, 3)


def run_case(case: Case, model_dir: str, args: argparse.Namespace) -> CaseResult:
    """In this (fresh) process: start the engine, measure, shut it down."""
    from serval import LLM, SamplingParams

    compiles = KernelCompiles()
    device_args = dict(device="cpu", dtype="float32") if args.tiny else dict(gpu_memory_utilization=0.85)
    max_model_len = min(args.max_model_len, SHAPES[case.shape]["max_position_embeddings"])
    llm = LLM(model=model_dir, load_format="dummy", skip_tokenizer_init=True, max_model_len=max_model_len,
              tensor_parallel_size=case.tensor_parallel_size, distributed_executor_backend=case.executor,
              enforce_eager=args.enforce_eager, cudagraph_mixed=case.cudagraph_mixed, **device_args)
    try:
        rng = random.Random(0)
        vocab = SHAPES[case.shape]["vocab_size"]

        def prompt(length: int) -> dict:
            return {"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(length)]}

        def timed(prompts: list[dict], max_tokens: int) -> float:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            started = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            return time.perf_counter() - started

        timed([prompt(32)], 8)  # warm-up: first-call compilation and allocations
        one = prompt(32)
        first = min(timed([one], 1) for _ in range(2))
        full = min(timed([one], args.decode_tokens) for _ in range(2))
        decode_tok_s = (args.decode_tokens - 1) / max(full - first, 1e-9)
        weight_bytes = llm.engine.memory_usage().weight_bytes
        roofline = args.hbm_gbps * 1e9 / weight_bytes
        prompts = [prompt(args.input_len) for _ in range(args.num_prompts)]
        # Untimed passes first: the batched prefill and the decode batch sizes compile Triton variants the warm-up
        # above never ran; the first case measured would pay them (the next finds them in the disk cache). The
        # first pass fills the prefix cache, so only from the second on are the steps the timed pass's.
        for _ in range(args.warmup_passes):
            timed(prompts, args.output_len)
        before = compiles.count, compiles.seconds
        seconds = timed(prompts, args.output_len)
        new_kernels, compile_seconds = compiles.since(*before)
        output_tokens = args.num_prompts * args.output_len
        return CaseResult(case.name, case.shape, case.tensor_parallel_size, executor_name(case),
                          round(weight_bytes / 1024**3, 2), round(decode_tok_s, 1), round(roofline, 1),
                          round(decode_tok_s / roofline, 3), round(output_tokens / seconds, 1),
                          round((output_tokens + args.num_prompts * args.input_len) / seconds, 1), round(seconds, 2),
                          cuda_graphs=llm.engine.runner.graphs is not None,
                          async_scheduling=bool(llm.engine.async_scheduling), cudagraph_mixed=case.cudagraph_mixed,
                          mixed_graphs=llm.engine.runner.mixed_graphs is not None,
                          num_kv_blocks=llm.engine.get_stats().num_blocks, timed_new_kernels=new_kernels,
                          timed_compile_seconds=compile_seconds)
    finally:
        llm.engine.shutdown()


def run_in_subprocess(case: Case, model_dir: str, argv: list[str], timeout: float) -> CaseResult:
    command = [sys.executable, os.path.abspath(__file__), *argv, "--run-case", json.dumps(asdict(case)),
               "--model-dir", model_dir]
    try:
        python_path = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
                              env={**os.environ, "PYTHONPATH": python_path})
    except subprocess.TimeoutExpired:
        return failed(case, f"timed out after {timeout:.0f}s")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return failed(case, (done.stderr or done.stdout)[-2000:])
    return CaseResult(**json.loads(lines[-1]))


def failed(case: Case, error: str) -> CaseResult:
    return CaseResult(case.name, case.shape, case.tensor_parallel_size, executor_name(case),
                      None, None, None, None, None, None, None, error, cudagraph_mixed=case.cudagraph_mixed)


def print_table(results: list[CaseResult]) -> None:
    header = (f"{'case':<18} {'tp':>3} {'executor':<11} {'graphs':>6} {'mixed':>5} {'async':>5} {'GiB/GPU':>8} "
              f"{'b1 tok/s':>9} {'roofline':>9} {'of roof':>8} {'offline out tok/s':>18} {'total tok/s':>12} "
              f"{'KV blocks':>10} {'new kernels':>11} {'compile s':>9}")
    lines = [header, "-" * len(header)]

    def yes(flag) -> str:
        return "yes" if flag else "no"

    for r in results:
        if r.error:
            lines.append(f"{r.name:<18} {r.tensor_parallel_size:>3} failed: {r.error.splitlines()[-1][:120]}")
            continue
        # mixed: "yes" replayed from graphs, "asked" with --cudagraph-mixed but nothing captured (a CPU)
        mixed = "yes" if r.mixed_graphs else "asked" if r.cudagraph_mixed else "no"
        lines.append(f"{r.name:<18} {r.tensor_parallel_size:>3} {r.executor:<11} {yes(r.cuda_graphs):>6} {mixed:>5} "
                     f"{yes(r.async_scheduling):>5} {r.weight_gib_per_gpu:>8} "
                     f"{r.batch1_decode_tok_s:>9} {r.roofline_tok_s:>9} {r.roofline_fraction:>8} "
                     f"{r.offline_output_tok_s:>18} {r.offline_total_tok_s:>12} {str(r.num_kv_blocks):>10} "
                     f"{str(r.timed_new_kernels):>11} {str(r.timed_compile_seconds):>9}")
    for mixed in (False, True):
        by_name = {r.name: r for r in results if not r.error and r.cudagraph_mixed == mixed}
        if "tp1-engine" in by_name and "tp1-executor" in by_name:
            engine, executor = by_name["tp1-engine"], by_name["tp1-executor"]
            lines.append(f"tp=1 through the executor / in-process, mixed graphs {'on' if mixed else 'off'}: batch-1 "
                         f"{executor.batch1_decode_tok_s / engine.batch1_decode_tok_s:.3f}, offline "
                         f"{executor.offline_output_tok_s / engine.offline_output_tok_s:.3f}")
    sys.stdout.write("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, gloo, a 2-layer model (a check of the script)")
    parser.add_argument("--cases", nargs="*", default=None, help="run only these case names")
    parser.add_argument("--num-prompts", type=int, default=None, help="offline requests (default 1000; tiny 16)")
    parser.add_argument("--input-len", type=int, default=None, help="prompt tokens (default 256; tiny 16)")
    parser.add_argument("--output-len", type=int, default=None, help="tokens generated (default 128; tiny 8)")
    parser.add_argument("--decode-tokens", type=int, default=None, help="batch-1 decode length (default 256)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--hbm-gbps", type=float, default=4800.0, help="one GPU's memory bandwidth (H200: 4800)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="no CUDA graphs on any rank (by default every case captures them, the executor's too)")
    parser.add_argument("--mixed-graphs", choices=sorted(MIXED_SETTINGS), default="both",
                        help="run every case with mixed prefill/decode graphs off, on, or both (default)")
    parser.add_argument("--warmup-passes", type=int, default=2,
                        help="untimed offline passes before the timed one (default 2: the second is the timed "
                             "pass's twin, prefix-cache hits and all; 1 reproduces the old, order-dependent rows)")
    parser.add_argument("--case-timeout", type=float, default=900.0)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--run-case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup_passes < 0:
        parser.error(f"--warmup-passes must be >= 0, got {args.warmup_passes}")
    defaults = (16, 16, 8, 16) if args.tiny else (1000, 256, 128, 256)
    for name, default in zip(("num_prompts", "input_len", "output_len", "decode_tokens"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.run_case is not None:
        result = run_case(Case(**json.loads(args.run_case)), args.model_dir, args)
        sys.stdout.write(json.dumps(asdict(result)) + "\n")
        return 0
    import torch
    num_devices = 0 if args.tiny else torch.cuda.device_count()
    if not args.tiny and num_devices == 0:
        parser.error("no CUDA device: use --tiny for the CPU check")
    forwarded = ["--tiny"] * args.tiny + ["--enforce-eager"] * args.enforce_eager + [
        f"--{name.replace('_', '-')}={getattr(args, name)}"
        for name in ("num_prompts", "input_len", "output_len", "decode_tokens", "max_model_len", "hbm_gbps",
                     "warmup_passes")]
    results = []
    with tempfile.TemporaryDirectory(prefix="serval-tp-bench-") as directory:
        for case in cases_for(args, num_devices):
            results.append(run_in_subprocess(case, write_config(directory, case.shape), forwarded, args.case_timeout))
            sys.stderr.write(f"done: {case.name} (mixed graphs {'on' if case.cudagraph_mixed else 'off'})\n")
    print_table(results)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump({"hbm_gbps": args.hbm_gbps, "num_devices": num_devices, "results": [asdict(r) for r in results]},
                      f, indent=2)
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
