"""Multi-LoRA throughput (issue 19): the base model alone vs 1, 8 and 32 rank-16 adapters, each request drawing an
adapter at random, in one run on one engine (the base rows are requests without an adapter on the same engine, whose
decode graphs hold the LoRA kernels: on a row without an adapter they return at once).

Llama-3-8B shape (benchmarks/configs/llama-3-8b, dummy bf16 weights, no download); adapters in PEFT format with
random weights on q/k/v/o/gate/up/down, written under --out. Workloads: 512 x (512 in, 256 out), and the
1000-request workload as benchmarks/gpu_suite.py draws it (inputs uniform in [128, 1024], outputs in [128, 512],
the same seed and order of draws). Every request ignores EOS. Reports output tok/s and TPOT p50/p99 per workload
and adapter count, and the throughput loss against the base. Goal: <= 15% loss with 8 adapters, <= 25% with 32.

    python benchmarks/lora_bench.py --out results/lora            # one H200 (PYTHONPATH=/tmp/site:.)
    python benchmarks/lora_bench.py --adapter-counts 8 32 --profile --out results/lora  # where a step's time goes
    python benchmarks/lora_bench.py --tiny --profile --out results/lora_tiny  # a tiny random Llama on CPU

Base and LoRA sections run on one engine (base requests carry no adapter), so they share its graph settings:
mixed-step graphs on unless --cudagraph-mixed off; --separate-base runs the base on an engine without LoRA.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import random
import statistics
import time

import torch

from serval import LLM, LoRARequest, SamplingParams

logger = logging.getLogger("lora_bench")

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
               "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
               "vocab_size": 4096, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "hidden_act": "silu",
               "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "float32"}


def random_prompts(rng: random.Random, count: int, low: int, high: int, vocab: int) -> list[list[int]]:
    """benchmarks/gpu_suite.py's draw, kept identical so the workloads are the same requests."""
    return [[rng.randrange(1000, vocab - 1000) for _ in range(rng.randint(low, high))] for _ in range(count)]


def projection_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """PEFT module name -> (in_features, out_features) of the Llama projections."""
    hidden, intermediate = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate), "down_proj": (intermediate, hidden)}


def write_adapter(path: str, config: dict, rank: int, seed: int, dtype: torch.dtype) -> None:
    """A PEFT LoRA folder with random weights (what peft's save_pretrained writes)."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, (fan_in, fan_out) in projection_shapes(config).items():
            block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            a = torch.randn(rank, fan_in, generator=generator) * fan_in ** -0.5
            tensors[f"{prefix}.lora_A.weight"] = a.to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=generator) * 0.01).to(dtype)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
                   "bias": "none", "use_rslora": False, "task_type": "CAUSAL_LM"}, f)


def run_workload(llm: LLM, prompts: list[list[int]], output_lens: list[int],
                 lora_requests: list[LoRARequest | None]) -> dict:
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in output_lens]
    llm.generate([{"prompt_token_ids": p} for p in prompts[:8]], params[:8], use_tqdm=False,
                 lora_request=lora_requests[:8])  # warm-up (and the adapters into host memory)
    llm.engine.kv_cache.reset_prefix_cache()
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                           lora_request=lora_requests)
    elapsed = time.perf_counter() - started
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    tpots = sorted((o.metrics.last_token_time - o.metrics.first_token_time) / (len(o.outputs[0].token_ids) - 1)
                   for o in outputs if len(o.outputs[0].token_ids) > 1)
    return {"num_requests": len(prompts), "elapsed_s": elapsed, "output_tokens": out_tokens,
            "output_tokens_per_s": out_tokens / elapsed,
            "tpot_p50_ms": 1000 * statistics.median(tpots) if tpots else None,
            "tpot_p99_ms": 1000 * tpots[min(len(tpots) - 1, int(0.99 * len(tpots)))] if tpots else None,
            "num_preemptions": llm.engine.get_stats().num_preemptions}


def profile_steps(llm: LLM, prompts: list[list[int]], output_lens: list[int],
                  lora_requests: list[LoRARequest | None], skip: int, active: int) -> dict:
    """Where a step's time goes: the workload's requests queued on the engine, `skip` steps run (the batch fills),
    then `active` steps under torch's profiler, then the rest aborted. GPU: kernel time per step by kind (base
    GEMMs, attention, the LoRA kernels, other kernels, copies), kernel launches per step, and the wall time the
    GPU was not busy (the host's share). CPU: the LoRA layers' time (their add_lora, labelled serval::lora) and
    the GEMMs' against the wall time."""
    from torch.profiler import ProfilerActivity, profile, record_function
    engine, on_gpu = llm.engine, torch.cuda.is_available() and llm.engine.runner.device.type == "cuda"
    if engine.lora is not None:  # label the LoRA layers' eager work (graph replays are labelled by kernel name)
        for layer in engine.lora.lora_layers.layers.values():
            layer.add_lora = _labelled(layer.add_lora, record_function)
    ids = [f"profile-{index}" for index in range(len(prompts))]
    for request_id, prompt, num_out, lora in zip(ids, prompts, output_lens, lora_requests):
        engine.add_request(request_id, {"prompt_token_ids": prompt},
                           SamplingParams(temperature=0.0, max_tokens=num_out, ignore_eos=True), stream=False,
                           lora_request=lora)
    for _ in range(skip):
        engine.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    if on_gpu:
        torch.cuda.synchronize()
    started = time.perf_counter()
    with profile(activities=activities) as profiler:
        steps = 0
        while steps < active and engine.has_unfinished_requests():
            engine.step()
            steps += 1
        if on_gpu:
            torch.cuda.synchronize()
    wall = time.perf_counter() - started
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    if engine.lora is not None:
        for layer in engine.lora.lora_layers.layers.values():
            del layer.add_lora
    return _step_breakdown(profiler, wall, max(steps, 1), on_gpu)


def _labelled(method, record_function):
    def labelled(*args, **kwargs):
        with record_function("serval::lora"):
            return method(*args, **kwargs)
    return labelled


KERNEL_KINDS = (("lora", ("lora",)), ("attention", ("attention", "attn", "flash", "combine_splits", "write_kv")),
                ("gemm", ("gemm", "gemv", "cutlass", "nvjet", "xmma", "matmul", "cublas", "sm90_", "sm80_")),
                ("copy", ("memcpy", "memset")))


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS if any(mark in lowered for mark in marks)), "other")


def _step_breakdown(profiler, wall: float, steps: int, on_gpu: bool) -> dict:
    per_step = {"steps": steps, "wall_ms": 1000 * wall / steps}
    events = profiler.key_averages()
    lora = next((event for event in events if event.key == "serval::lora"), None)
    # The host time of eager steps' LoRA layers (graph replays run none: their LoRA is in the kernels' time).
    per_step["lora_host_ms"] = (lora.cpu_time_total / 1000 / steps) if lora else 0.0
    if on_gpu:
        kernels = [event for event in events if str(event.device_type).endswith("CUDA")]
        busy = {kind: 0.0 for kind, _ in KERNEL_KINDS} | {"other": 0.0}
        launches = dict.fromkeys(busy, 0)
        for event in kernels:
            kind = kernel_kind(event.key)
            busy[kind] += _device_us(event) / 1000
            launches[kind] += event.count
        per_step.update({f"{kind}_ms": value / steps for kind, value in busy.items()})
        per_step["gpu_busy_ms"] = sum(busy.values()) / steps
        per_step["host_gap_ms"] = per_step["wall_ms"] - per_step["gpu_busy_ms"]
        per_step["launches"] = {kind: count / steps for kind, count in launches.items()}
        top = sorted(kernels, key=_device_us, reverse=True)[:12]
        per_step["top_kernels"] = [{"name": event.key[:90], "kind": kernel_kind(event.key),
                                    "ms_per_step": _device_us(event) / 1000 / steps, "count": event.count / steps}
                                   for event in top]
    else:  # the CPU runs the ops themselves: the LoRA layers' time, the base GEMMs' (outside them), the rest
        gemm_us = sum(event.self_cpu_time_total for event in profiler.events()
                      if event.name in ("aten::mm", "aten::addmm", "aten::bmm") and not _inside_lora(event))
        per_step["lora_ms"] = per_step["lora_host_ms"]
        per_step["gemm_ms"] = gemm_us / 1000 / steps
        per_step["other_ms"] = per_step["wall_ms"] - per_step["lora_ms"] - per_step["gemm_ms"]
    return per_step


def _inside_lora(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == "serval::lora":
            return True
        parent = parent.cpu_parent
    return False


def _device_us(event) -> float:
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="benchmarks/configs/llama-3-8b")
    parser.add_argument("--out", default="results/lora")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama on CPU with small workloads")
    parser.add_argument("--adapter-counts", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--num-requests", type=int, default=1000, help="the gpu_suite workload's size (0: skip it)")
    parser.add_argument("--num-fixed", type=int, default=512, help="requests of the 512-in/256-out workload")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--cudagraph-mixed", choices=["on", "off"], default="on",
                        help="mixed prefill/decode step graphs (base and LoRA runs alike: they share the engine)")
    parser.add_argument("--separate-base", action="store_true",
                        help="run the base on an engine without --enable-lora (built first, freed before the LoRA "
                             "engine), instead of base requests on the LoRA engine")
    parser.add_argument("--profile", action="store_true",
                        help="after each section, profile --profile-steps of its steps (torch profiler): base GEMMs "
                             "vs LoRA kernels vs attention vs host, per step")
    parser.add_argument("--profile-skip", type=int, default=40, help="steps run before the profiled ones")
    parser.add_argument("--profile-steps", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.makedirs(args.out, exist_ok=True)
    model_dir, fixed_in, fixed_out = args.model, 512, 256
    engine_args = dict(load_format="dummy", dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.9,
                       cudagraph_mixed=args.cudagraph_mixed == "on")
    if args.tiny:
        model_dir = os.path.join(args.out, "tiny_model")
        os.makedirs(model_dir, exist_ok=True)
        with open(os.path.join(model_dir, "config.json"), "w") as f:
            json.dump(TINY_CONFIG, f)
        args.num_requests, args.num_fixed = min(args.num_requests, 24), min(args.num_fixed, 16)
        args.profile_skip, args.profile_steps = min(args.profile_skip, 4), min(args.profile_steps, 4)
        fixed_in, fixed_out = 64, 16
        engine_args = dict(load_format="dummy", dtype="float32", device="cpu", max_model_len=2048)
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    max_adapters = max(args.adapter_counts)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    started = time.perf_counter()
    adapters = []
    for index in range(max_adapters):
        path = os.path.join(args.out, "adapters", f"adapter{index}")
        if not os.path.isfile(os.path.join(path, "adapter_model.safetensors")):
            write_adapter(path, config, args.rank, seed=index, dtype=dtype)
        adapters.append(LoRARequest(f"adapter{index}", index + 1, path))
    results: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else "cpu",
                     "torch": torch.__version__, "python": platform.python_version(), "model": model_dir,
                     "tiny": args.tiny, "rank": args.rank, "adapters_written_s": time.perf_counter() - started,
                     "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                     "cudagraph_mixed": engine_args.get("cudagraph_mixed", False),
                     "base_engine": "separate, without --enable-lora" if args.separate_base else "the LoRA engine"}
    engine_args |= dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    lora_args = dict(enable_lora=True, max_loras=max_adapters, max_lora_rank=args.rank, max_cpu_loras=max_adapters)
    vocab = config["vocab_size"]
    rng = random.Random(0)
    random_prompts(rng, 1, 128, 128, vocab)  # gpu_suite's batch-1 prompt: drawn first there, so drawn here too
    high = 1024 if not args.tiny else 200
    prompts_1000 = random_prompts(rng, args.num_requests, 128 if not args.tiny else 16, high, vocab)
    outputs_1000 = [rng.randint(128, 512) if not args.tiny else rng.randint(4, 16) for _ in prompts_1000]
    prompts_fixed = random_prompts(rng, args.num_fixed, fixed_in, fixed_in, vocab)
    workloads = {f"{args.num_fixed}x({fixed_in},{fixed_out})": (prompts_fixed, [fixed_out] * len(prompts_fixed))}
    if prompts_1000:
        workloads[f"{args.num_requests}_requests"] = (prompts_1000, outputs_1000)
    choice = random.Random(1)
    sections = [(workload, count, [choice.choice(adapters[:count]) if count else None for _ in prompts])
                for workload, (prompts, _) in workloads.items() for count in [0, *args.adapter_counts]]
    if args.separate_base:  # the base sections first, on their own engine, which is freed before the LoRA one's
        base_llm = LLM(model=model_dir, **engine_args)
        run_sections(base_llm, [s for s in sections if s[1] == 0], workloads, results, args)
        base_llm.shutdown()
        del base_llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        sections = [s for s in sections if s[1] > 0]
    llm = LLM(model=model_dir, **engine_args, **lora_args)
    run_sections(llm, sections, workloads, results, args)
    print_table(results)


def run_sections(llm: LLM, sections: list, workloads: dict, results: dict, args) -> None:
    """Each (workload, adapter count, each request's adapter) timed, then profiled with --profile; the loss against
    the workload's base section; the JSON rewritten after each."""
    for workload, count, lora_requests in sections:
        prompts, output_lens = workloads[workload]
        name = f"{workload}/{'base' if count == 0 else f'{count}_adapters'}"
        try:
            results[name] = run_workload(llm, prompts, output_lens, lora_requests)
            if args.profile:
                results[name]["profile"] = profile_steps(llm, prompts, output_lens, lora_requests,
                                                         args.profile_skip, args.profile_steps)
        except Exception as error:  # noqa: BLE001 - one section failing must not lose the others
            logger.exception("section failed", extra={"section": name})
            results[name] = {"error": repr(error)}
        base = results.get(f"{workload}/base", {}).get("output_tokens_per_s")
        if count and base and "output_tokens_per_s" in results[name]:
            results[name]["loss_vs_base"] = 1 - results[name]["output_tokens_per_s"] / base
        with open(os.path.join(args.out, "lora_bench.json"), "w") as f:
            json.dump(results, f, indent=2)


def print_table(results: dict) -> None:
    rows = [("section", "out tok/s", "TPOT p50 ms", "TPOT p99 ms", "loss vs base")]
    profiles = []
    for name, value in results.items():
        if isinstance(value, dict) and "output_tokens_per_s" in value:
            loss = value.get("loss_vs_base")
            rows.append((name, f"{value['output_tokens_per_s']:.1f}", f"{value['tpot_p50_ms']:.2f}",
                         f"{value['tpot_p99_ms']:.2f}", "" if loss is None else f"{100 * loss:.1f}%"))
            if "profile" in value:
                profiles.append((name, value["profile"]))
        elif isinstance(value, dict) and "error" in value:
            rows.append((name, "error", value["error"][:40], "", ""))
    print(f"\nLoRA bench: {results['device']}, torch {results['torch']}, {results['model']}, rank {results['rank']}, "
          f"mixed-step graphs {'on' if results['cudagraph_mixed'] else 'off'}, base on {results['base_engine']}")
    print_rows(rows)
    if profiles:
        columns = [key for key in ("wall_ms", "gpu_busy_ms", "host_gap_ms", "gemm_ms", "attention_ms", "lora_ms",
                                   "other_ms", "copy_ms") if key in profiles[0][1]]
        if "gpu_busy_ms" in profiles[0][1]:
            columns.append("lora_host_ms")
        rows = [("profiled steps (ms per step)", *[key.removesuffix("_ms") for key in columns], "launches")]
        for name, profile in profiles:
            launches = profile.get("launches")
            rows.append((name, *[f"{profile[key]:.2f}" for key in columns],
                         "" if launches is None else f"{sum(launches.values()):.0f} ({launches['lora']:.0f} lora)"))
        print()
        print_rows(rows)


def print_rows(rows: list[tuple]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:  # the benchmark's result, as benchmarks/gpu_suite.py prints its table
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)))


if __name__ == "__main__":
    main()
