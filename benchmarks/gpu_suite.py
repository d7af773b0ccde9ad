"""The GPU benchmark suite (issue 7): one command, a table at the end, JSON under --out.

Llama-3-8B shape (benchmarks/configs/llama-3-8b, dummy bf16 weights, no download), on one GPU; any other shape
under benchmarks/configs with --model (e.g. the mixture-of-experts qwen3-30b-a3b and mixtral-8x7b):
  1. device bandwidth (a large device-to-device copy, bytes read + written) and the batch-1 decode roofline it
     implies: bytes each decode step must read (every weight except the embedding table, of which one row is
     gathered, and, in a mixture-of-experts layer, except the experts the token is not routed to: attention, the
     router, the k chosen experts and any shared expert; plus the KV cache) / bandwidth;
  2. batch-1 decode tokens/s, 128-token prompt, 256 new tokens: Serval vs transformers `generate` with a static
     cache, on the same weights (transformers' model shares Serval's tensors) in the same run;
  3. offline throughput: 1000 requests, input lengths uniform in [128, 1024], outputs uniform in [128, 512]; and
     512 x (512 in, 256 out), Serval vs transformers `generate_batch` (continuous batching, paged sdpa).
Every request ignores EOS, so each produces exactly its output length.

--checkpoint-format block-fp8|awq|gptq|compressed-w4a16 runs Serval on a checkpoint format as published (the
model's config.json plus that quantization_config, written under --out; the dummy weights are quantized into the
format at load, so the kernels and bytes are a real checkpoint's); transformers runs bf16 as with --quantization.

--formats bf16,fp8,block-fp8,awq runs batch 1 and 512 x (512, 256) once per format, each in its own process (the
whole GPU each), and prints them side by side with each format's own roofline: bf16, fp8 (per-channel, at load),
and the --checkpoint-format layouts. --tiny runs a two-layer shape (hidden 256, so 128-blocks and groups fill) on
the CPU with short workloads: the CPU check of the script, no GPU numbers.

--quantization fp8 and --kv-cache-dtype fp8 run Serval's sections on float8 weights and/or KV cache (quantized at
load from the same dummy bf16 weights); transformers still runs bf16 (its generate_batch in a child process on
the same seed's weights; its batch-1 `generate`, which shares Serval's weights, is skipped then).

    python benchmarks/gpu_suite.py --out results/gpu [--model benchmarks/configs/llama-3-8b] [--skip-hf]
        [--skip-hf-generate-batch] [--skip-variants] [--profile] [--quantization fp8] [--kv-cache-dtype fp8]
        [--num-requests 0 (skips the 1000-request workload)] [--checkpoint-format awq] [--cudagraph-mixed]
    python benchmarks/gpu_suite.py --out results/gpu_formats --formats bf16,fp8,block-fp8,awq,gptq,compressed-w4a16
    python benchmarks/gpu_suite.py --out results/gpu_qwen3_30b_a3b --model benchmarks/configs/qwen3-30b-a3b
    python benchmarks/gpu_suite.py --out results/gpu_mixtral_8x7b --model benchmarks/configs/mixtral-8x7b
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import random
import subprocess
import sys
import time
import traceback

import torch

from serval import LLM, SamplingParams

logger = logging.getLogger("gpu_suite")


def measure_bandwidth(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"error": "no GPU: no bandwidth, no roofline"}
    import triton.testing
    num_bytes = 4 * 1024**3
    src = torch.randn(num_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=100, rep=500, return_mode="median")
    del src, dst
    torch.cuda.empty_cache()
    return {"copy_bytes": num_bytes, "copy_ms": ms, "bandwidth_gb_s": 2 * num_bytes / ms / 1e6}


# The tensors a quantized linear layer keeps as buffers (serval.layers.quant): read by every decode step.
QUANTIZED_BUFFERS = ("weight_scale", "weight_scale_inv", "qweight", "scales", "zeros", "g_idx")
# --checkpoint-format: the quantization_config each published format's config.json carries.
CHECKPOINT_FORMATS = {
    "block-fp8": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
    "compressed-w4a16": {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
                         "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                             "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                             "group_size": 128}}}},
}


# --formats: what each format runs as (--quantization, --checkpoint-format).
FORMATS = {"bf16": (None, None), "fp8": ("fp8", None), **{name: (None, name) for name in CHECKPOINT_FORMATS}}
TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
               "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
               "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": 4096,
               "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}


def quantized_config_dir(model_dir: str, checkpoint_format: str, out: str) -> str:
    """A copy of model_dir's config.json with the format's quantization_config, under out."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = CHECKPOINT_FORMATS[checkpoint_format]
    path = os.path.join(out, f"model_{checkpoint_format}")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return path


def decode_bytes_per_token(model: torch.nn.Module, context_len: int, kv_element_size: int) -> dict:
    # float8 weights count one byte each, and their per-row scales count too.
    scales = [b for name, b in model.named_buffers() if name.rsplit(".", 1)[-1] in QUANTIZED_BUFFERS]
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *scales])
    embedding = model.model.embed_tokens.weight
    gathered_table = embedding.numel() * embedding.element_size() if not model.tie_word_embeddings else 0
    kv = 2 * model.num_layers * model.num_kv_heads * model.head_dim * kv_element_size * context_len
    unread_experts = unread_expert_bytes(model)
    read = weights - gathered_table - unread_experts
    return {"weight_bytes": weights, "weight_bytes_read": read, "kv_bytes_read": kv,
            "moe_expert_bytes_not_read": unread_experts, "bytes_per_token": read + kv}


def unread_expert_bytes(model: torch.nn.Module) -> int:
    """A mixture-of-experts layer reads only the k experts a token is routed to (and its router and any shared
    expert, counted with the other weights): the other E - k experts' bytes are not part of a token's roofline."""
    from serval.layers.moe import SparseMoeBlock
    unread = 0
    for block in model.modules():
        if isinstance(block, SparseMoeBlock):
            experts = block.experts
            expert_bytes = sum(p.numel() * p.element_size() for p in experts.parameters())
            unread += expert_bytes * (experts.num_experts - block.top_k) // experts.num_experts
    return unread


def random_prompts(rng: random.Random, count: int, low: int, high: int, vocab: int) -> list[list[int]]:
    return [[rng.randrange(1000, vocab - 1000) for _ in range(rng.randint(low, high))] for _ in range(count)]


def serval_decode_batch1(llm: LLM, prompt: list[int], new_tokens: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate({"prompt_token_ids": prompt}, params.clone(max_tokens=16), use_tqdm=False)  # warm-up
    runs = []
    for _ in range(3):
        llm.engine.kv_cache.reset_prefix_cache()
        started = time.perf_counter()
        out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
        elapsed = time.perf_counter() - started
        metrics = out.metrics
        decode_s = metrics.last_token_time - metrics.first_token_time
        runs.append({"elapsed_s": elapsed, "ttft_s": metrics.first_token_time - metrics.arrival_time,
                     "decode_tokens_per_s": (new_tokens - 1) / decode_s})
    best = max(runs, key=lambda r: r["decode_tokens_per_s"])
    return {**best, "runs": runs}


def serval_batch1_variants(llm: LLM, prompt: list[int], new_tokens: int) -> dict:
    """Batch-1 decode with one part of the fast path switched off at a time: asynchronous scheduling; the Triton
    GEMV (cuBLAS instead); programmatic dependent launch. Graphs are recaptured for the kernel switches. Says
    what each is worth, in the same run."""
    engine = llm.engine
    results = {}
    engine.async_scheduling = False
    results["no_async_scheduling"] = serval_decode_batch1(llm, prompt, new_tokens)
    engine.async_scheduling = True
    for name, variable, value in (("cublas_gemv", "SERVAL_GEMV", "cublas"), ("no_pdl", "SERVAL_PDL", "0")):
        os.environ[variable] = value
        engine.runner.graphs.capture()
        results[name] = serval_decode_batch1(llm, prompt, new_tokens)
        del os.environ[variable]
    engine.runner.graphs.capture()
    return {name: {k: v for k, v in r.items() if k != "runs"} for name, r in results.items()}


def serval_throughput(llm: LLM, prompts: list[list[int]], output_lens: list[int]) -> dict:
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in output_lens]
    llm.generate([{"prompt_token_ids": p} for p in prompts[:8]], params[:8], use_tqdm=False)  # warm-up
    llm.engine.kv_cache.reset_prefix_cache()
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    in_tokens = sum(len(p) for p in prompts)
    return {"num_requests": len(prompts), "elapsed_s": elapsed, "input_tokens": in_tokens, "output_tokens": out_tokens,
            "output_tokens_per_s": out_tokens / elapsed, "total_tokens_per_s": (in_tokens + out_tokens) / elapsed,
            "num_preemptions": llm.engine.get_stats().num_preemptions}


def hf_model_sharing_weights(model: torch.nn.Module, hf_config) -> torch.nn.Module:
    """transformers' model for the same config whose parameters are views of Serval's: same weights, no copy."""
    import transformers
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=next(model.parameters()).dtype)
    device = next(model.parameters()).device
    state = {}
    for name, param in model.named_parameters():
        for shard in model._shards_of(name):
            tensor = param.data if shard is None else model._module_of(name).shard(param.data, shard)
            state[model._hf_name(name, shard)] = tensor
    if model.tie_word_embeddings:
        state["lm_head.weight"] = model.model.embed_tokens.weight.data
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
    # Non-persistent buffers (rotary inverse frequencies) are still on the meta device: rebuild them.
    for module_name, module in hf.named_modules():
        if module_name.endswith("rotary_emb"):
            parent = hf.get_submodule(module_name.rsplit(".", 1)[0])
            setattr(parent, "rotary_emb", type(module)(hf.config).to(device))
    return hf.eval()


def hf_decode_batch1(hf, prompt: list[int], new_tokens: int) -> dict:
    ids = torch.tensor([prompt], device="cuda")

    def generate(n: int) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation="static",
                    pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - started

    generate(16)  # warm-up
    first = min(generate(1) for _ in range(2))
    whole = min(generate(new_tokens) for _ in range(2))
    return {"elapsed_s": whole, "ttft_s": first, "decode_tokens_per_s": (new_tokens - 1) / (whole - first)}


def hf_generate_batch(hf, prompts: list[list[int]], new_tokens: int) -> dict:
    from transformers import GenerationConfig
    for name in ("paged|sdpa", "sdpa_paged"):
        try:
            hf.set_attn_implementation(name)
            break
        except Exception:  # noqa: BLE001 - the name changed across transformers 5.x releases
            continue
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    hf.generate_batch(inputs=prompts[:8], generation_config=config)  # warm-up
    # The parent reads this line if it has to stop the run: the timed part's start, for an honest bound.
    print(json.dumps({"generation_started_at": time.time()}), flush=True)
    started = time.perf_counter()
    outputs = hf.generate_batch(inputs=prompts, generation_config=config)
    elapsed = time.perf_counter() - started
    out_tokens = sum(len(o.generated_tokens) for o in outputs.values())
    in_tokens = sum(len(p) for p in prompts)
    return {"num_requests": len(prompts), "elapsed_s": elapsed, "input_tokens": in_tokens, "output_tokens": out_tokens,
            "output_tokens_per_s": out_tokens / elapsed, "total_tokens_per_s": (in_tokens + out_tokens) / elapsed,
            "attn_implementation": hf.config._attn_implementation}


def hf_generate_batch_in_child(args, prompts: list[list[int]]) -> dict:
    """transformers' generate_batch in a child process, so that a run slower than --hf-timeout can be stopped and
    reported as a bound. The child loads the same dummy weights (same seed) through Serval's loader."""
    prompts_file = os.path.join(args.out, "prompts_512.json")
    with open(prompts_file, "w") as f:
        json.dump(prompts, f)
    command = [sys.executable, __file__, "--child-hf-generate-batch", prompts_file, "--model", args.model]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.hf_timeout)
    except subprocess.TimeoutExpired as stopped:
        elapsed = time.perf_counter() - started
        output_tokens = 256 * len(prompts)
        partial = stopped.stdout.decode() if isinstance(stopped.stdout, bytes) else (stopped.stdout or "")
        marks = [json.loads(line) for line in partial.splitlines() if line.startswith('{"generation_started_at"')]
        if not marks:  # still loading or warming up: no bound on the timed part
            return {"error": f"did not reach the timed run in {args.hf_timeout} s", "elapsed_s_at_least": elapsed}
        # The timed run was still going: it needs more than this, so its rate is below the bound.
        timed_at_least = time.time() - marks[-1]["generation_started_at"]
        return {"error": f"did not finish in {args.hf_timeout} s", "elapsed_s_at_least": elapsed,
                "generation_s_at_least": timed_at_least,
                "output_tokens_per_s_at_most": output_tokens / timed_at_least}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{") and "generation_started_at" not in line]
    if done.returncode != 0 or not lines:
        return {"error": f"child exited {done.returncode}", "stderr_tail": done.stderr[-2000:]}
    return json.loads(lines[-1])


def child_hf_generate_batch(prompts_file: str, model_path: str) -> None:
    from serval.model.loader import load_model
    with open(prompts_file) as f:
        prompts = json.load(f)
    model, hf_config = load_model(model_path, load_format="dummy", dtype=torch.bfloat16, device="cuda", seed=0)
    hf = hf_model_sharing_weights(model, hf_config)
    print(json.dumps(hf_generate_batch(hf, prompts, 256)), flush=True)


def profile_serval(llm: LLM, prompts: list[list[int]], out_dir: str) -> dict:
    """PyTorch profiler over a batch-1 decode, a batch-256 decode and a prefill: where the time goes (tables to files)."""
    from torch.profiler import ProfilerActivity, profile
    result = {}
    cases = (("batch1", prompts[:1], 128, 48), ("batch256", prompts[:256], 128, 48),
             ("prefill", prompts[:32], 512, 1))  # 32 prompts of up to 512 tokens: prefill only
    for name, batch, prompt_len, new_tokens in cases:
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        llm.engine.kv_cache.reset_prefix_cache()
        llm.generate([{"prompt_token_ids": p[:prompt_len]} for p in batch], params, use_tqdm=False)
        llm.engine.kv_cache.reset_prefix_cache()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            started = time.perf_counter()
            llm.generate([{"prompt_token_ids": p[:prompt_len]} for p in batch], params, use_tqdm=False)
            result[f"{name}_elapsed_s"] = time.perf_counter() - started
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
        with open(os.path.join(out_dir, f"profile_{name}.txt"), "w") as f:
            f.write(table)
        events = prof.key_averages()
        result[f"{name}_cuda_time_s"] = sum(e.self_device_time_total for e in events) / 1e6
    return result


def run_section(results: dict, name: str, fn, *args) -> None:
    started = time.perf_counter()
    try:
        results[name] = fn(*args)
    except Exception as error:  # noqa: BLE001 - one failed section must not lose the others' numbers
        results[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    results[name]["section_s"] = time.perf_counter() - started
    print(f"[{name}] {json.dumps({k: v for k, v in results[name].items() if k != 'traceback'})[:400]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="benchmarks/configs/llama-3-8b")
    parser.add_argument("--out", default="results/gpu")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-hf-generate-batch", action="store_true",
                        help="skip transformers' generate_batch (minutes; its number does not move with Serval's)")
    parser.add_argument("--skip-hf-batch1", action="store_true",
                        help="skip transformers' static-cache batch-1 generate (its torch.compile takes minutes)")
    parser.add_argument("--skip-variants", action="store_true",
                        help="skip batch-1 with asynchronous scheduling, the Triton GEMV or PDL switched off")
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--profile", action="store_true", help="also write PyTorch profiler tables under --out")
    parser.add_argument("--hf-timeout", type=float, default=200.0, help="seconds for transformers' generate_batch")
    parser.add_argument("--quantization", default=None, choices=[None, "fp8"])
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--checkpoint-format", default=None, choices=[None, *CHECKPOINT_FORMATS],
                        help="run Serval on this published quantized format (dummy weights quantized into it)")
    parser.add_argument("--formats", default=None,
                        help=f"comma-separated, from {list(FORMATS)}: batch 1 and 512 x (512, 256) of each, one table")
    parser.add_argument("--format-timeout", type=float, default=240.0, help="seconds per format with --formats")
    parser.add_argument("--tiny", action="store_true", help="a two-layer shape on the CPU, short workloads")
    parser.add_argument("--cudagraph-mixed", action=argparse.BooleanOptionalAction, default=None,
                        help="capture steps that mix prefill chunks with decodes in CUDA graphs (the engine flag of "
                             "that name; unset: the engine's default, on with --quantization fp8)")
    parser.add_argument("--child-hf-generate-batch", metavar="PROMPTS_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_hf_generate_batch:
        child_hf_generate_batch(args.child_hf_generate_batch, args.model)
        return
    logging.basicConfig(level=logging.WARNING)
    os.makedirs(args.out, exist_ok=True)
    if args.formats:
        run_formats(args)
        return
    device = torch.device("cpu" if args.tiny else "cuda")
    # Sizes of the batch-1 run and the 512-request workload: the issue's, or a CPU's worth with --tiny.
    batch1_tokens, count_512, prompt_512, output_512 = (16, 8, 32, 8) if args.tiny else (256, 512, 512, 256)
    if args.tiny:
        args.model = write_tiny_model(args.out)
        args.skip_hf = args.skip_variants = True
        args.num_requests = 0
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "torch": torch.__version__,
                     "python": platform.python_version(), "model": args.model, "dtype": "bfloat16",
                     "quantization": args.quantization or args.checkpoint_format,
                     "kv_cache_dtype": args.kv_cache_dtype,
                     "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                     "cudagraph_mixed_asked": args.cudagraph_mixed}
    run_section(results, "bandwidth", measure_bandwidth, device)

    started = time.perf_counter()
    serval_model = (quantized_config_dir(args.model, args.checkpoint_format, args.out) if args.checkpoint_format
                    else args.model)
    llm = LLM(model=serval_model, load_format="dummy", dtype="bfloat16", max_model_len=2048,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              gpu_memory_utilization=0.9, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
              device=device.type, cudagraph_mixed=args.cudagraph_mixed)
    results["serval_startup_s"] = time.perf_counter() - started
    mixed_graphs = llm.engine.runner.mixed_graphs
    results["mixed_graph_token_buckets"] = mixed_graphs.sizes if mixed_graphs is not None else []
    if mixed_graphs is not None:
        results["mixed_graph_capture_s"] = mixed_graphs.capture_seconds
        results["mixed_graph_pool_gib"] = mixed_graphs.pool_bytes / 1024**3
    results["kv_cache_blocks"] = llm.engine.kv_cache.num_blocks
    model = llm.engine.model
    vocab = model.vocab_size
    rng = random.Random(0)
    roofline = decode_bytes_per_token(model, context_len=128 + 128,
                                      kv_element_size=llm.engine.runner.kv_caches[0].element_size())
    bandwidth = results["bandwidth"].get("bandwidth_gb_s")
    if bandwidth:
        roofline["roofline_tokens_per_s"] = bandwidth * 1e9 / roofline["bytes_per_token"]
        roofline["roofline_all_weights_tokens_per_s"] = bandwidth * 1e9 / roofline["weight_bytes"]
    results["roofline"] = roofline

    prompt_128 = random_prompts(rng, 1, 128, 128, vocab)[0]
    run_section(results, "serval_batch1", serval_decode_batch1, llm, prompt_128, batch1_tokens)
    if not args.skip_variants:
        run_section(results, "serval_batch1_variants", serval_batch1_variants, llm, prompt_128, batch1_tokens)
    prompts_1000 = random_prompts(rng, args.num_requests, 128, 1024, vocab)
    outputs_1000 = [rng.randint(128, 512) for _ in prompts_1000]
    if prompts_1000:
        run_section(results, "serval_1000", serval_throughput, llm, prompts_1000, outputs_1000)
    prompts_512 = [p[:prompt_512] for p in random_prompts(rng, 512, 512, 512, vocab)[:count_512]]
    run_section(results, "serval_512x512x256", serval_throughput, llm, prompts_512, [output_512] * count_512)
    if args.profile:
        run_section(results, "serval_profile", profile_serval, llm, prompts_1000, args.out)

    if not args.skip_hf:
        # transformers gets the card: Serval's KV cache and graphs go. Its bf16 weights stay, shared by transformers'
        # batch-1 model; float8 ones cannot be shared, so they go too and that model is skipped.
        shares_weights = args.quantization is None and args.checkpoint_format is None
        hf_config = llm.engine.hf_config
        llm.engine.runner.kv_caches.clear()
        llm.engine.runner.graphs = None
        llm.engine.runner.mixed_graphs = None
        if not shares_weights:
            del llm, model
        gc.collect()
        torch.cuda.empty_cache()
        if shares_weights and not args.skip_hf_batch1:
            hf = hf_model_sharing_weights(model, hf_config)
            run_section(results, "hf_batch1_static", hf_decode_batch1, hf, prompt_128, 256)
            del hf
        if shares_weights:
            del llm, model  # the child loads its own copy (a Mixtral-8x7B shape is two thirds of an H200)
            gc.collect()
            torch.cuda.empty_cache()
        results["serval_memory_left_for_transformers_gib"] = torch.cuda.memory_allocated(device) / 1024**3
        if not args.skip_hf_generate_batch:
            run_section(results, "hf_generate_batch_512x512x256", hf_generate_batch_in_child, args, prompts_512)

    with open(os.path.join(args.out, "gpu_suite.json"), "w") as f:
        json.dump(results, f, indent=2)
    print_table(results)


def write_tiny_model(out: str) -> str:
    path = os.path.join(out, "tiny_model")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(TINY_CONFIG, f, indent=1)
    return path


def run_formats(args) -> None:
    """--formats: this script once per format in a child process (a fresh GPU each), then one table."""
    formats = [name.strip() for name in args.formats.split(",") if name.strip()]
    unknown = [name for name in formats if name not in FORMATS]
    if unknown:
        raise SystemExit(f"--formats: unknown {unknown}; choose from {list(FORMATS)}")
    results = {}
    for name in formats:
        quantization, checkpoint_format = FORMATS[name]
        out = os.path.join(args.out, name)
        command = [sys.executable, os.path.abspath(__file__), "--out", out, "--model", args.model, "--skip-hf",
                   "--skip-variants", "--num-requests", "0", "--kv-cache-dtype", args.kv_cache_dtype,
                   "--max-num-seqs", str(args.max_num_seqs),
                   "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
        command += ["--quantization", quantization] if quantization else []
        command += ["--checkpoint-format", checkpoint_format] if checkpoint_format else []
        command += ["--tiny"] if args.tiny else []
        started = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.format_timeout)
            error = None if done.returncode == 0 else f"exited {done.returncode}: {done.stderr[-1500:]}"
        except subprocess.TimeoutExpired:
            error = f"did not finish in {args.format_timeout} s"
        path = os.path.join(out, "gpu_suite.json")
        results[name] = json.load(open(path)) if error is None and os.path.exists(path) else {"error": error}
        results[name]["format_s"] = time.perf_counter() - started
        print(f"[{name}] {results[name].get('error') or 'done'} in {results[name]['format_s']:.0f} s", flush=True)
    with open(os.path.join(args.out, "gpu_formats.json"), "w") as f:
        json.dump(results, f, indent=2)
    print_formats_table(results)


def print_formats_table(results: dict) -> None:
    first = next((r for r in results.values() if "device" in r), {})
    print(f"\nFormats side by side: {first.get('device')}, {first.get('model')} (dummy weights quantized into each "
          f"format), KV cache {first.get('kv_cache_dtype')}")
    print("| format | GB read per token | batch-1 decode tok/s | % of its roofline | vs bf16 | "
          "512 x (512, 256) output tok/s | vs bf16 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = results.get("bf16", {})

    def get(result: dict, section: str, key: str) -> float | None:
        return result.get(section, {}).get(key)
    base_batch1 = get(base, "serval_batch1", "decode_tokens_per_s")
    base_512 = get(base, "serval_512x512x256", "output_tokens_per_s")
    for name, result in results.items():
        if "error" in result:
            print(f"| {name} | FAILED: {str(result['error'])[:200]} |")
            continue
        batch1 = get(result, "serval_batch1", "decode_tokens_per_s")
        out_512 = get(result, "serval_512x512x256", "output_tokens_per_s")
        roof = result.get("roofline", {}).get("roofline_tokens_per_s")
        share = f"{100 * batch1 / roof:.1f}%" if batch1 and roof else "-"
        gb_per_token = result["roofline"]["bytes_per_token"] / 1e9
        print(f"| {name} | {gb_per_token:.3f} | {batch1 or float('nan'):.1f} | {share} | "
              f"{_ratio(batch1, base_batch1)} | {out_512 or float('nan'):,.0f} | {_ratio(out_512, base_512)} |")


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value and base else "-"


def print_table(results: dict) -> None:
    def get(section: str, key: str) -> float | None:
        return results.get(section, {}).get(key)

    print(f"\nGPU suite: {results['device']}, torch {results['torch']}, {results['model']} (dummy bf16 weights; "
          f"Serval quantization {results.get('quantization')}, KV cache {results.get('kv_cache_dtype', 'auto')})")
    buckets = results.get("mixed_graph_token_buckets") or []
    print("  mixed prefill/decode steps: " + (
        f"CUDA graphs, {len(buckets)} token buckets up to {buckets[-1]}, captured in "
        f"{results.get('mixed_graph_capture_s', 0):.1f} s, {results.get('mixed_graph_pool_gib', 0):.2f} GiB"
        if buckets else "eager"))
    bandwidth = get("bandwidth", "bandwidth_gb_s")
    roof = results.get("roofline", {}).get("roofline_tokens_per_s")
    print(f"  device-to-device copy: {bandwidth or float('nan'):.0f} GB/s; batch-1 decode roofline "
          f"{roof or float('nan'):.1f} tok/s ({results['roofline']['bytes_per_token'] / 1e9:.2f} GB read per token)")
    rows = [("batch-1 decode tok/s", "serval_batch1", "hf_batch1_static", "decode_tokens_per_s"),
            ("1000 req output tok/s", "serval_1000", None, "output_tokens_per_s"),
            ("1000 req total tok/s", "serval_1000", None, "total_tokens_per_s"),
            ("512x(512,256) output tok/s", "serval_512x512x256", "hf_generate_batch_512x512x256",
             "output_tokens_per_s")]
    print(f"  {'measure':<30}{'serval':>12}{'transformers':>14}{'ratio':>9}")
    for label, ours, theirs, key in rows:
        a, b = get(ours, key), get(theirs, key) if theirs else None
        ratio = f"{a / b:.2f}x" if a and b else "-"
        print(f"  {label:<30}{a or float('nan'):>12.1f}{b or float('nan'):>14.1f}{ratio:>9}")
    if roof and get("serval_batch1", "decode_tokens_per_s"):
        print(f"  serval batch-1 decode = {100 * get('serval_batch1', 'decode_tokens_per_s') / roof:.1f}% of roofline")
    for name, variant in results.get("serval_batch1_variants", {}).items():
        if isinstance(variant, dict) and roof:
            print(f"  batch-1 decode, {name.replace('_', ' ')}: {variant['decode_tokens_per_s']:.1f} tok/s "
                  f"({100 * variant['decode_tokens_per_s'] / roof:.1f}% of roofline)")
    for name, section in results.items():
        if isinstance(section, dict) and "error" in section:
            print(f"  {name} FAILED: {section['error']}")
    bound = get("hf_generate_batch_512x512x256", "output_tokens_per_s_at_most")
    ours = get("serval_512x512x256", "output_tokens_per_s")
    if bound and ours:
        print(f"  transformers' generate_batch was stopped after {get('hf_generate_batch_512x512x256', 'generation_s_at_least'):.0f} s "
              f"of its timed run: < {bound:.1f} output tok/s, so Serval > {ours / bound:.1f}x")


if __name__ == "__main__":
    main()
