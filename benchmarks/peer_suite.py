"""Serval next to vLLM on the same GPU in one device call (issue 23): the same prompts, settings and weights' shape.

Each engine runs in its own child process, one per (engine, precision), one after the other, so each has the whole
GPU: Serval with its own PYTHONPATH (--serval-pythonpath), vLLM with only its staged wheels on the path
(--vllm-site, see ../shared/peers/README.md) and the environment that README requires. Both read one plan file
(the token-id prompts and output lengths, drawn as benchmarks/gpu_suite.py draws them: same seed, same order), run
dummy weights of the --model config (Llama-3-8B shape by default), max_model_len 2048, the same max_num_seqs and
max_num_batched_tokens, every request ignoring EOS. Rows (--rows, comma-separated; device time is scarce):

    bf16-batch1   batch-1 decode tok/s, 128-token prompt, 256 new tokens (wall clock: (256 - 1) / (t(256) - t(1)))
    bf16-1000     1000 requests, input U[128, 1024], output U[128, 512]: total tok/s
    bf16-512      512 x (512 in, 256 out): output tok/s
    fp8-*         the same three with float8 weights (quantization="fp8") and a float8 KV cache (kv_cache_dtype="fp8")

--profile instead runs torch.profiler over the 1000-request workload (its first --profile-num-requests prompts) and
the fp8 batch-1 decode, in each engine (vLLM through its profiler_config, traces written by its worker), and sums
the GPU kernels of each trace by kind: GEMM, attention, sampling, quantization, other kernels, and the host gaps
(the trace's span that no kernel covers). Prints a table and writes JSON beside it.

    python benchmarks/peer_suite.py --out results/peer [--rows bf16-batch1,fp8-batch1] [--profile]
        [--serval-engine-args '{"cudagraph_mixed_sizes": "16,32,64"}']   # an A/B of a Serval setting
        [--vllm-site /tmp/site] [--serval-pythonpath /tmp/serval-site:.] [--skip-peer] [--tiny]
    python benchmarks/peer_suite.py --serve-table results/peer_serve   (after benchmarks/peer_serve.sh)

--tiny --skip-peer runs Serval's side end to end on the CPU with a two-layer shape (what the CPU check runs).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from serval.bench.traces import Kernel, kernels_from_chrome_trace, summarize_kernels  # noqa: E402
PRECISIONS = {"bf16": {"quantization": None, "kv_cache_dtype": "auto"},
              "fp8": {"quantization": "fp8", "kv_cache_dtype": "fp8"}}
WORKLOADS = ("batch1", "1000", "512")
ROWS = tuple(f"{precision}-{workload}" for precision in PRECISIONS for workload in WORKLOADS)
ROW_LABELS = {"batch1": "batch-1 decode tok/s (128-token prompt)", "1000": "1000 requests, total tok/s",
              "512": "512 x (512 in, 256 out), output tok/s"}
ROW_METRIC = {"batch1": "decode_tokens_per_s", "1000": "total_tokens_per_s", "512": "output_tokens_per_s"}
# vLLM needs these on the H200 machine (../shared/peers/README.md): flashinfer is not carried, no network.
VLLM_ENV = {"VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1",
            "VLLM_LOGGING_LEVEL": "WARNING"}
TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
               "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
               "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": 4096,
               "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}


@dataclass
class Plan:
    """What both engines run: written once by the parent, read by every child."""
    model: str
    rows: list[str]
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    gpu_memory_utilization: float
    device: str
    prompt_128: list[int]
    prompts_1000: list[list[int]]
    outputs_1000: list[int]
    prompts_512: list[list[int]]
    batch1_new_tokens: int = 256
    output_len_512: int = 256
    serval_engine_args: dict = field(default_factory=dict)  # --serval-engine-args: more LLM(...) arguments
    profile: bool = False
    profile_num_requests: int = 1000
    out: str = "."


def random_prompts(rng: random.Random, count: int, low: int, high: int, vocab: int) -> list[list[int]]:
    # benchmarks/gpu_suite.py's draw, call for call, so both suites measure the same prompts.
    return [[rng.randrange(1000, vocab - 1000) for _ in range(rng.randint(low, high))] for _ in range(count)]


def draw_workloads(vocab: int, num_requests: int) -> dict:
    rng = random.Random(0)
    prompt_128 = random_prompts(rng, 1, 128, 128, vocab)[0]
    prompts_1000 = random_prompts(rng, num_requests, 128, 1024, vocab)
    outputs_1000 = [rng.randint(128, 512) for _ in prompts_1000]
    prompts_512 = random_prompts(rng, 512, 512, 512, vocab)
    return {"prompt_128": prompt_128, "prompts_1000": prompts_1000, "outputs_1000": outputs_1000,
            "prompts_512": prompts_512}


# ---- the two engines, behind the same four calls ------------------------------------------------------------

class ServalEngine:
    name = "serval"

    def __init__(self, plan: Plan, precision: str) -> None:
        from serval import LLM, SamplingParams  # here: the parent process needs neither engine's dependencies
        self.sampling_params = SamplingParams
        options = PRECISIONS[precision]
        self.llm = LLM(model=plan.model, load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
                       max_model_len=plan.max_model_len, max_num_seqs=plan.max_num_seqs,
                       max_num_batched_tokens=plan.max_num_batched_tokens,
                       gpu_memory_utilization=plan.gpu_memory_utilization, device=plan.device,
                       quantization=options["quantization"], kv_cache_dtype=options["kv_cache_dtype"],
                       **plan.serval_engine_args)

    def version(self) -> str:
        import serval
        return getattr(serval, "__version__", "dev")

    def generate(self, prompts: list[list[int]], output_lens: list[int]) -> int:
        params = [self.sampling_params(temperature=0.0, max_tokens=n, ignore_eos=True) for n in output_lens]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs)

    def reset_prefix_cache(self) -> None:
        self.llm.engine.kv_cache.reset_prefix_cache()

    def stats(self) -> dict:
        """The scheduler's counters so far: a throughput row that falls behind shows whether it preempted."""
        engine = self.llm.engine
        return {"num_kv_blocks": engine.kv_cache.num_blocks, "block_size": engine.config.block_size,
                "num_preemptions": engine.scheduler.num_preemptions}


class VllmEngine:
    name = "vllm"

    def __init__(self, plan: Plan, precision: str, profile_dir: str | None = None) -> None:
        from vllm import LLM, SamplingParams
        self.sampling_params = SamplingParams
        options = PRECISIONS[precision]
        extra = {}
        if profile_dir:
            extra["profiler_config"] = vllm_profiler_config(profile_dir)
        # vLLM's defaults otherwise: torch.compile, CUDA graphs, FlashAttention 3, prefix caching, chunked prefill.
        self.llm = LLM(model=plan.model, load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
                       max_model_len=plan.max_model_len, max_num_seqs=plan.max_num_seqs,
                       max_num_batched_tokens=plan.max_num_batched_tokens,
                       gpu_memory_utilization=plan.gpu_memory_utilization, seed=0,
                       quantization=options["quantization"],
                       kv_cache_dtype="auto" if options["kv_cache_dtype"] == "auto" else "fp8", **extra)

    def version(self) -> str:
        import vllm
        return vllm.__version__

    def generate(self, prompts: list[list[int]], output_lens: list[int]) -> int:
        # No tokenizer (skip_tokenizer_init): nothing to detokenize.
        params = [self.sampling_params(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
                  for n in output_lens]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs)

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()


def vllm_profiler_config(profile_dir: str):
    """vLLM >= 0.13's ProfilerConfig (the --profiler-config flag); older ones read VLLM_TORCH_PROFILER_DIR."""
    try:
        from vllm.config import ProfilerConfig
    except ImportError:
        os.environ["VLLM_TORCH_PROFILER_DIR"] = profile_dir
        return None
    return ProfilerConfig(profiler="torch", torch_profiler_dir=profile_dir, torch_profiler_with_stack=False,
                          torch_profiler_record_shapes=False)


# ---- the workloads ----------------------------------------------------------------------------------------

def synchronize() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decode_batch1(engine, prompt: list[int], new_tokens: int) -> dict:
    """Decode tok/s at batch 1 from wall clock, the same way for both engines: the time of a 256-token request
    less that of a 1-token one (its prefill and first token), over the 255 tokens between. Best of three."""
    engine.generate([prompt], [16])  # warm-up

    def timed(n: int) -> float:
        engine.reset_prefix_cache()
        synchronize()
        started = time.perf_counter()
        produced = engine.generate([prompt], [n])
        synchronize()
        assert produced == n, (produced, n)
        return time.perf_counter() - started

    first = min(timed(1) for _ in range(3))
    whole = min(timed(new_tokens) for _ in range(3))
    return {"ttft_s": first, "elapsed_s": whole, "decode_tokens_per_s": (new_tokens - 1) / (whole - first)}


def throughput(engine, prompts: list[list[int]], output_lens: list[int]) -> dict:
    engine.generate(prompts[:8], output_lens[:8])  # warm-up
    engine.reset_prefix_cache()
    synchronize()
    started = time.perf_counter()
    out_tokens = engine.generate(prompts, output_lens)
    synchronize()
    elapsed = time.perf_counter() - started
    in_tokens = sum(len(p) for p in prompts)
    return {"num_requests": len(prompts), "elapsed_s": elapsed, "input_tokens": in_tokens, "output_tokens": out_tokens,
            "output_tokens_per_s": out_tokens / elapsed, "total_tokens_per_s": (in_tokens + out_tokens) / elapsed}


def run_workload(engine, plan: Plan, workload: str) -> dict:
    if workload == "batch1":
        return decode_batch1(engine, plan.prompt_128, plan.batch1_new_tokens)
    if workload == "1000":
        return throughput(engine, plan.prompts_1000, plan.outputs_1000)
    return throughput(engine, plan.prompts_512, [plan.output_len_512] * len(plan.prompts_512))


# ---- profiles: GPU kernel time by kind, and the host gaps between kernels --------------------------------

def kernels_from_profiler(prof) -> list[Kernel]:
    """The GPU kernels of a finished torch.profiler.profile, read from its Kineto events (lighter than
    prof.events() on traces of a million kernels)."""
    from torch.autograd import DeviceType
    kernels = []
    for event in prof.profiler.kineto_results.events():
        if event.device_type() == DeviceType.CUDA:
            kernels.append(Kernel(event.name(), event.start_ns() / 1e3, event.duration_ns() / 1e3))
    if kernels:
        return kernels
    # No GPU (the CPU check): the innermost CPU ops stand in for kernels, so the summary is still exercised.
    return [Kernel(e.name, e.time_range.start, e.time_range.elapsed_us()) for e in prof.events()
            if e.device_type == DeviceType.CPU and not e.cpu_children and e.name.startswith("aten::")]


def profile_cases(plan: Plan, precision: str) -> list[tuple[str, list[list[int]], list[int]]]:
    count = plan.profile_num_requests
    if precision == "bf16":
        return [("bf16-1000", plan.prompts_1000[:count], plan.outputs_1000[:count])]
    return [("fp8-batch1", [plan.prompt_128], [plan.batch1_new_tokens]), ("fp8-1000", plan.prompts_1000[:count],
                                                       plan.outputs_1000[:count])]


def profile_serval(plan: Plan, precision: str) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile
    engine = ServalEngine(plan, precision)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    result = {"version": engine.version()}
    for name, prompts, output_lens in profile_cases(plan, precision):
        engine.generate(prompts[:8], output_lens[:8])  # warm-up outside the trace
        engine.reset_prefix_cache()
        with profile(activities=activities) as prof:
            started = time.perf_counter()
            engine.generate(prompts, output_lens)
            synchronize()
            wall = time.perf_counter() - started
        result[name] = summarize_kernels(kernels_from_profiler(prof), wall)
    return result


def profile_vllm(plan: Plan, precision: str) -> dict:
    # One engine for every case (a second LLM in one process may not get the memory the first one held back);
    # each start/stop writes a new trace into the one directory.
    trace_dir = os.path.abspath(os.path.join(plan.out, f"vllm_traces_{precision}"))
    os.makedirs(trace_dir, exist_ok=True)
    engine = VllmEngine(plan, precision, profile_dir=trace_dir)
    result = {"version": engine.version()}
    for name, prompts, output_lens in profile_cases(plan, precision):
        engine.generate(prompts[:8], output_lens[:8])  # warm-up outside the trace
        engine.reset_prefix_cache()
        before = set(trace_files(trace_dir))
        engine.llm.start_profile()
        started = time.perf_counter()
        engine.generate(prompts, output_lens)
        wall = time.perf_counter() - started
        engine.llm.stop_profile()
        # The worker's trace holds the GPU kernels; a front-end process may write a CPU-only one beside it.
        kernels = max((kernels_from_chrome_trace(t) for t in wait_for_new_traces(trace_dir, before)), key=len,
                      default=[])
        result[name] = (summarize_kernels(kernels, wall) if kernels
                        else {"error": f"no new trace with GPU kernels under {trace_dir}"})
    return result


def trace_files(trace_dir: str) -> list[str]:
    paths = glob.glob(os.path.join(trace_dir, "**", "*.json*"), recursive=True)
    return sorted((p for p in paths if not p.endswith(".tmp")), key=os.path.getmtime)


def wait_for_new_traces(trace_dir: str, before: set[str], timeout_s: float = 180.0) -> list[str]:
    """vLLM's worker writes its trace after stop_profile returns: wait until a new file is there and has stopped
    growing."""
    deadline, last_size = time.monotonic() + timeout_s, -1
    while time.monotonic() < deadline:
        traces = [t for t in trace_files(trace_dir) if t not in before]
        size = sum(os.path.getsize(t) for t in traces)
        if traces and size == last_size:
            return traces
        last_size = size
        time.sleep(3.0)
    return []


# ---- child processes --------------------------------------------------------------------------------------

def child_main(engine_name: str, precision: str, plan_path: str, result_path: str) -> None:
    with open(plan_path) as f:
        plan = Plan(**json.load(f))
    result: dict = {"engine": engine_name, "precision": precision}
    try:
        if plan.profile:
            result["profile"] = (profile_serval if engine_name == "serval" else profile_vllm)(plan, precision)
        else:
            started = time.perf_counter()
            engine = ServalEngine(plan, precision) if engine_name == "serval" else VllmEngine(plan, precision)
            result["startup_s"] = time.perf_counter() - started
            result["version"] = engine.version()
            for row in plan.rows:
                row_precision, workload = row.split("-", 1)
                if row_precision != precision:
                    continue
                started = time.perf_counter()
                try:
                    result[row] = run_workload(engine, plan, workload)
                except Exception as error:  # noqa: BLE001 - one failed row must not lose the others
                    result[row] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
                result[row]["section_s"] = time.perf_counter() - started
                if hasattr(engine, "stats"):
                    result[row]["engine_stats"] = engine.stats()
                write_json(result_path, result)
    except Exception as error:  # noqa: BLE001 - reported in the parent's table
        result["error"] = f"{type(error).__name__}: {error}"
        result["traceback"] = traceback.format_exc()
    write_json(result_path, result)


def write_json(path: str, data: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


def run_child(args, engine_name: str, precision: str, plan_path: str) -> dict:
    result_path = os.path.join(args.out, f"{engine_name}_{precision}{'_profile' if args.profile else ''}.json")
    env = dict(os.environ)
    if engine_name == "vllm":
        env.update(VLLM_ENV)
        env["PYTHONPATH"] = args.vllm_site  # vLLM's pinned wheels only; Serval's are on another path
    else:
        env["PYTHONPATH"] = args.serval_pythonpath or os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")])
    command = [sys.executable, os.path.abspath(__file__), "--child", engine_name, "--precision", precision,
               "--plan", plan_path, "--result", result_path]
    log_path = os.path.join(args.out, f"{engine_name}_{precision}.log")
    started = time.perf_counter()
    with open(log_path, "w") as log:
        # Its own session, so that the engine processes it starts (vLLM's engine core) go with it.
        child = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            returncode = child.wait(timeout=args.child_timeout)
        except subprocess.TimeoutExpired:
            returncode = "timeout"
        end_session(child)
    result = {}
    if os.path.exists(result_path):
        with open(result_path) as f:
            result = json.load(f)
    result["child_s"] = time.perf_counter() - started
    if returncode != 0:
        with open(log_path) as f:
            result.setdefault("error", f"child exited {returncode}")
            result["log_tail"] = f.read()[-3000:]
    print(f"[{engine_name} {precision}] {json.dumps(compact(result))[:600]}", flush=True)
    return result


def end_session(child: subprocess.Popen) -> None:
    """Stop the child and whatever it started that outlived it, then wait until the GPU's memory is given back
    (the next engine sizes its KV cache from what is free)."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    child.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        used = gpu_memory_used_mib()
        if used is None or used < 2048:
            return
        time.sleep(2)


def gpu_memory_used_mib() -> float | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=30)
        return float(done.stdout.split()[0]) if done.returncode == 0 and done.stdout.strip() else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def compact(result: dict) -> dict:
    return {k: compact(v) if isinstance(v, dict) else v for k, v in result.items()
            if k not in ("traceback", "log_tail", "top_kernels")}


# ---- the parent: plan, children, table ---------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/peer")
    parser.add_argument("--model", default=os.path.join(REPO_ROOT, "benchmarks/configs/llama-3-8b"))
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {list(ROWS)}")
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--engines", default="vllm,serval", help="which engines run, in this order")
    parser.add_argument("--skip-peer", action="store_true", help="Serval only (no vLLM on this machine)")
    parser.add_argument("--vllm-site", default="/tmp/site", help="vLLM's PYTHONPATH (its staged wheels)")
    parser.add_argument("--serval-pythonpath", default=None,
                        help="Serval's PYTHONPATH (default: the repository root, then this process's PYTHONPATH)")
    parser.add_argument("--serval-engine-args", type=json.loads, default={}, metavar="JSON",
                        help='more engine arguments for Serval only, e.g. \'{"cudagraph_mixed_sizes": "16,32,64"}\'')
    parser.add_argument("--child-timeout", type=float, default=540.0, help="seconds per engine and precision")
    parser.add_argument("--profile", action="store_true",
                        help="profile the 1000-request workload (bf16, fp8) and fp8 batch 1 instead of timing rows")
    parser.add_argument("--profile-num-requests", type=int, default=200,
                        help="the first N prompts of the 1000-request workload under the profiler (vLLM's worker "
                             "takes minutes to write the trace of all 1000)")
    parser.add_argument("--tiny", action="store_true", help="a two-layer shape on the CPU (the CPU check)")
    parser.add_argument("--serve-table", metavar="DIR", help="print the serving comparison of peer_serve.sh")
    parser.add_argument("--child", choices=["serval", "vllm"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=list(PRECISIONS), help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child, args.precision, args.plan, args.result)
        return
    if args.serve_table:
        print_serve_table(args.serve_table)
        return
    rows = [row.strip() for row in args.rows.split(",") if row.strip()]
    unknown = [row for row in rows if row not in ROWS]
    if unknown:
        parser.error(f"--rows: unknown {unknown}; choose from {list(ROWS)}")
    os.makedirs(args.out, exist_ok=True)
    args.out = os.path.abspath(args.out)
    model, device = os.path.abspath(args.model), "auto"
    if args.tiny:
        model, device = write_tiny_model(args.out), "cpu"
    with open(os.path.join(model, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    workloads = draw_workloads(vocab, args.num_requests)
    if args.tiny:  # the same draws, cut to what two CPU cores finish in a minute
        workloads = {"prompt_128": workloads["prompt_128"][:32],
                     "prompts_1000": [p[:24] for p in workloads["prompts_1000"][:12]],
                     "outputs_1000": [n // 32 for n in workloads["outputs_1000"][:12]],
                     "prompts_512": [p[:16] for p in workloads["prompts_512"][:8]]}
    sizes = {"batch1_new_tokens": 32, "output_len_512": 16} if args.tiny else {}
    plan = Plan(model=model, rows=rows, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                gpu_memory_utilization=args.gpu_memory_utilization, device=device, profile=args.profile,
                profile_num_requests=args.profile_num_requests, out=args.out,
                serval_engine_args=args.serval_engine_args, **workloads, **sizes)
    plan_path = os.path.join(args.out, "plan.json")
    write_json(plan_path, asdict(plan))
    engines = [e for e in args.engines.split(",") if e and not (args.skip_peer and e == "vllm")]
    precisions = [p for p in PRECISIONS if any(row.startswith(p + "-") for row in rows)]
    results = {"model": model, "settings": {k: v for k, v in asdict(plan).items() if not k.startswith("prompt")
                                                 and k != "outputs_1000"},
               "device": device_name(), "engines": {e: {} for e in engines}}
    for precision in precisions:
        for engine_name in engines:
            results["engines"][engine_name][precision] = run_child(args, engine_name, precision, plan_path)
            write_json(os.path.join(args.out, "peer_suite.json"), results)
    if args.profile:
        print_profile_table(results)
    else:
        print_table(results, rows)


def write_tiny_model(out: str) -> str:
    path = os.path.join(out, "tiny_model")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(TINY_CONFIG, f, indent=1)
    return path


def device_name() -> str:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30)
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else "cpu"
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"


def metric(results: dict, engine: str, row: str) -> float | None:
    precision, workload = row.split("-", 1)
    section = results["engines"].get(engine, {}).get(precision, {}).get(row, {})
    return section.get(ROW_METRIC[workload])


def print_table(results: dict, rows: list[str]) -> None:
    engines = results["engines"]
    versions = {e: next((s.get("version") for s in engines[e].values() if s.get("version")), "?") for e in engines}
    print(f"\nServal vs vLLM: {results['device']}, {results['model']} (dummy weights), max_model_len "
          f"{results['settings']['max_model_len']}, max_num_seqs {results['settings']['max_num_seqs']}, "
          f"max_num_batched_tokens {results['settings']['max_num_batched_tokens']}; versions {versions}")
    print("| measure | Serval | vLLM | Serval / vLLM |\n| --- | ---: | ---: | ---: |")
    for row in rows:
        precision, workload = row.split("-", 1)
        label = f"{'bf16' if precision == 'bf16' else 'fp8 weights + fp8 KV'}, {ROW_LABELS[workload]}"
        ours, theirs = metric(results, "serval", row), metric(results, "vllm", row)
        ratio = f"{ours / theirs:.2f}" if ours and theirs else "-"
        print(f"| {label} | {_number(ours)} | {_number(theirs)} | {ratio} |")
    for engine, by_precision in engines.items():
        for precision, section in by_precision.items():
            for key, value in section.items():
                if key == "error" or (isinstance(value, dict) and "error" in value):
                    error = value if key == "error" else value["error"]
                    print(f"  {engine} {precision} {key if key != 'error' else ''} FAILED: {error}")


def print_profile_table(results: dict) -> None:
    print(f"\nWhere the step time goes ({results['device']}; GPU kernel time by kind, host gaps = the trace's span "
          "that no kernel covers)")
    kinds = ("gemm", "attention", "sampling", "quantization", "other kernels", "host gaps")
    print("| engine | workload | span ms | " + " | ".join(kinds) + " |")
    print("| --- | --- | ---: | " + " | ".join("---:" for _ in kinds) + " |")
    for engine, by_precision in results["engines"].items():
        for precision, section in by_precision.items():
            for name, summary in section.get("profile", {}).items():
                if not isinstance(summary, dict):
                    continue
                if "error" in summary:
                    print(f"| {engine} | {name} | FAILED: {summary['error']} |")
                    continue
                cells = [f"{100 * summary['kinds'].get(k, {}).get('share', 0.0):.1f}%" for k in kinds]
                print(f"| {engine} | {name} | {summary['span_ms']:.0f} | " + " | ".join(cells) + " |")
            if "error" in section:
                print(f"| {engine} | {precision} | FAILED: {section['error']} |")


def print_serve_table(result_dir: str) -> None:
    """TTFT, TPOT and ITL p50/p99 per request rate of peer_serve.sh's `serval bench serve` runs: each Serval run
    (a folder named serval*) against vLLM's."""
    runs = {}
    for engine in sorted(os.listdir(result_dir)):
        path = os.path.join(result_dir, engine, "summary.json")
        if (engine == "vllm" or engine.startswith("serval")) and os.path.exists(path):
            with open(path) as f:
                report = json.load(f)
            runs[engine] = {run["request_rate"]: run["summary"] for e in report["endpoints"] for run in e["runs"]}
    for ours in [engine for engine in runs if engine != "vllm"]:
        if len(runs) > 2:
            print(f"\n{ours} against vllm\n")
        _print_serve_pair(runs, ours)


def _print_serve_pair(runs: dict, ours_name: str) -> None:
    engines = (ours_name, "vllm")
    rates = sorted({rate for e in engines for rate in runs.get(e, {})}, key=lambda r: float(r))
    print("| rate req/s | metric | Serval p50 | vLLM p50 | Serval p99 | vLLM p99 | p99 Serval / vLLM |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for rate in rates:
        for name in ("ttft", "tpot", "itl"):
            cells = {e: runs.get(e, {}).get(rate, {}).get(f"{name}_ms", {}) for e in engines}
            ours, theirs = cells[ours_name].get("p99"), cells["vllm"].get("p99")
            ratio = f"{ours / theirs:.2f}" if ours and theirs else "-"
            print(f"| {rate} | {name.upper()} ms | {_number(cells[ours_name].get('p50'))} | "
                  f"{_number(cells['vllm'].get('p50'))} | {_number(ours)} | {_number(theirs)} | {ratio} |")
        for e in engines:
            summary = runs.get(e, {}).get(rate)
            if summary:
                cache = (summary.get("prefix_cache") or {}).get("hit_rate")
                hits = "" if cache is None else f", prefix-cache hits {cache:.1%}"
                print(f"|  | {e} output tok/s | {summary['output_throughput']:,.0f} "
                      f"(failed {summary['failed']}{hits}) |")


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


if __name__ == "__main__":  # vLLM's engine core starts a child process that imports this file
    main()
