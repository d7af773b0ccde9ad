"""DeepSeek-V3's latent KV cache against full K/V (issue 17): one command, a table at the end, JSON under --out.

A DeepSeek-V3-shaped model scaled down to fit one GPU (benchmarks/configs/deepseek-v3-3l: DeepSeek-V3's widths,
3 layers, the first dense; dummy bf16 weights, no download) runs decode steps at a long context two ways:
  - latent: Serval's DeepseekV3ForCausalLM, whose cache keeps c_kv (512) + k_pe (64) per token and layer and whose
    decode attends through the absorbed weights (serval.layers.mla);
  - full K/V: the same model and weights with the latents expanded through kv_b_proj at write time and full K
    (128 heads x 192) and V (128 x 128, stored padded to 192 as the paged cache keeps one head size) cached and
    attended by the regular paged attention kernel.
For each, the KV bytes per token (all layers) and decode tokens/s for batch sizes at --context tokens (the cache
filled with random values: timing does not depend on them), each step a full forward and the logits.

The Mixtral-8x7B and Qwen3-30B-A3B numbers (batch-1 decode against the roofline of the bytes a token reads,
512 x (512, 256) against transformers' generate_batch) come from benchmarks/gpu_suite.py --model
benchmarks/configs/mixtral-8x7b (see docs/performance.md).

    python benchmarks/moe_suite.py --out results/moe_mla                 # H200: context 8192, batch 1, 8, 32
    python benchmarks/moe_suite.py --tiny --device cpu --out /tmp/mla    # a tiny shape, end to end on CPU

--experts SHAPE times one MoE layer's experts instead: the grouped fused-MoE kernel (serval.kernels.triton_moe),
the small-batch GEMV path (serval.kernels.triton_moe_gemv) and the torch loop over experts
(serval.layers.moe.fused_experts_reference), on bf16 dummy weights with the shape's router (gpt-oss: biases and the
clamped SwiGLU), per batch size, each kernel also as GB/s of the distinct chosen experts' weights; the `path`
column is the one triton_moe.fused_experts takes there. Writes moe_experts.json:

    python benchmarks/moe_suite.py --experts qwen3-30b-a3b --out results/moe_experts   # E=128, H=2048, I=768, top-8
    python benchmarks/moe_suite.py --experts gpt-oss-20b --out results/moe_experts    # E=32, H=I=2880, top-4
    python benchmarks/moe_suite.py --experts gpt-oss-120b --fp8 --out results/moe_experts   # E=128, and fp8
    python benchmarks/moe_suite.py --experts qwen3-30b-a3b --tiny --device cpu --out /tmp/moe_experts  # interpreter
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
import types
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
import transformers

from serval.layers.attention import attention_backend
from serval.model.loader import build_model, init_dummy_weights

TINY = dict(architectures=["DeepseekV3ForCausalLM"], vocab_size=320, hidden_size=64, intermediate_size=96,
            moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
            kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
            max_position_embeddings=512)


def full_kv_forward(self, positions, hidden, kv_cache, metadata):
    """DeepseekV3Attention.forward with full K/V in a regular paged cache: the baseline the latent cache saves on."""
    dims = self.dims
    q_nope, q_pe, latent, k_pe = self.project(positions, hidden)
    kv = self.kv_b_proj(latent).unflatten(-1, (dims.num_heads, -1))
    k_nope, value = kv.split([dims.qk_nope_head_dim, dims.v_head_dim], dim=-1)
    key = torch.cat((k_nope, k_pe.expand(-1, dims.num_heads, -1)), dim=-1)
    value = F.pad(value, (0, self.qk_head_dim - dims.v_head_dim))
    query = torch.cat((q_nope, q_pe), dim=-1)
    backend = attention_backend(hidden.device)
    backend.write_kv(kv_cache, key, value, metadata.slot_mapping)
    out = backend.paged_attention(query, kv_cache, metadata, self.scale)
    return self.o_proj(out[..., :dims.v_head_dim].flatten(-2))


def with_full_kv(model) -> None:
    dims = model.latent_dims
    qk_dim = dims.qk_nope_head_dim + dims.qk_rope_head_dim
    model.kv_cache_shape = lambda num_blocks, block_size: (2, num_blocks, block_size, dims.num_heads, qk_dim)
    for layer in model.model.layers:
        layer.self_attn.forward = types.MethodType(full_kv_forward, layer.self_attn)


@torch.inference_mode()
def decode_tokens_per_s(model, batch: int, context: int, block_size: int, steps: int, device) -> dict:
    """Decode steps for `batch` requests at `context` tokens each (cache pre-filled), full forward plus logits."""
    from serval.layers.attention import AttentionMetadata
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq
    shape = model.kv_cache_shape(num_blocks, block_size)
    dtype = model.lm_head.weight.dtype
    kv_caches = [torch.randn(shape, dtype=dtype, device=device) * 0.1 for _ in range(model.num_layers)]
    tables = torch.arange(num_blocks, dtype=torch.int32, device=device).view(batch, blocks_per_seq)
    last = context - 1
    slots = tables[:, last // block_size].long() * block_size + last % block_size
    metadata = AttentionMetadata(slot_mapping=slots, query_start_loc=list(range(batch + 1)), seq_lens=[context] * batch,
                                 block_tables=tables, block_size=block_size)
    input_ids = torch.randint(3, model.vocab_size, (batch,), device=device)
    positions = torch.full((batch,), last, device=device)

    def step():
        model.compute_logits(model(input_ids, positions, kv_caches, metadata))

    for _ in range(2):
        step()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - started) / steps
    cache_bytes = sum(c.nbytes for c in kv_caches)
    return {"batch": batch, "context": context, "step_ms": seconds * 1e3, "tokens_per_s": batch / seconds,
            "kv_cache_gib": cache_bytes / 1024**3}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kv_bytes_per_token(model, dtype: torch.dtype) -> int:
    return model.num_layers * int(torch.Size(model.kv_cache_shape(1, 1)).numel()) * dtype.itemsize


@dataclass(frozen=True)
class ExpertShape:
    num_experts: int
    hidden_size: int
    intermediate_size: int
    top_k: int
    # gpt-oss's experts: biases, the clamped SwiGLU and its router (top-k logits, then softmax); else SiLU and
    # softmax over all experts, top-k renormalised (Qwen3-MoE, Mixtral).
    gpt_oss: bool = True
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0


# The published configs (experts of one layer); tiny: a shape Triton's interpreter runs in seconds.
EXPERT_SHAPES = {
    "gpt-oss-20b": ExpertShape(num_experts=32, hidden_size=2880, intermediate_size=2880, top_k=4),
    "gpt-oss-120b": ExpertShape(num_experts=128, hidden_size=2880, intermediate_size=2880, top_k=4),
    "qwen3-30b-a3b": ExpertShape(num_experts=128, hidden_size=2048, intermediate_size=768, top_k=8, gpt_oss=False),
    "mixtral-8x7b": ExpertShape(num_experts=8, hidden_size=4096, intermediate_size=14336, top_k=2, gpt_oss=False),
    "tiny": ExpertShape(num_experts=8, hidden_size=64, intermediate_size=32, top_k=4),
}
# The GEMV path is timed up to this many (token, expert) slots: past it, it only re-reads experts from L2.
GEMV_TIMED_MAX_ROWS = 256


def tiny_version(shape: ExpertShape) -> ExpertShape:
    """The shape's routing (k, activation) on widths the interpreter runs in seconds (--tiny)."""
    return replace(shape, num_experts=min(shape.num_experts, 16), hidden_size=64, intermediate_size=32)


def time_ms(fn, device, repeats: int) -> float:
    """Median milliseconds per call: CUDA events on a GPU, the wall clock elsewhere."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
    return sorted(times)[len(times) // 2]


def expert_bytes(shape: ExpertShape, weight_itemsize: int, scaled: bool, dtype: torch.dtype) -> int:
    """Bytes one chosen expert's weights take: both stacks, plus float32 row scales (fp8) and biases (gpt-oss)."""
    rows = 2 * shape.intermediate_size + shape.hidden_size
    total = 3 * shape.intermediate_size * shape.hidden_size * weight_itemsize
    total += rows * 4 if scaled else 0
    return total + (rows * dtype.itemsize if shape.gpt_oss else 0)


@torch.inference_mode()
def expert_runs(shape: ExpertShape, batch_sizes: list[int], device, dtype, repeats: int, fp8: bool) -> list[dict]:
    """One row per batch size: the torch loop, and on a GPU (or in the interpreter) the grouped kernel and the
    small-batch GEMV path (serval.kernels.triton_moe_gemv), each also as GB/s of the distinct chosen experts'
    weights; fp8: both kernels on float8 experts too (quantization="fp8": scales per expert and row)."""
    from serval.layers.moe import ClampedSwiGLU, FusedMoE, fused_experts_reference, softmax_top_k, top_k_softmax
    paths = {}
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        from serval.kernels import triton_moe, triton_moe_gemv
        paths = {"grouped": triton_moe.fused_experts_grouped, "gemv": triton_moe_gemv.fused_experts_gemv}
        max_rows = triton_moe_gemv.max_rows(shape.intermediate_size, shape.hidden_size, device)
    generator = torch.Generator(device=device).manual_seed(0)
    experts, hidden, intermediate = shape.num_experts, shape.hidden_size, shape.intermediate_size

    def normal(*size, scale: float) -> torch.Tensor:
        return (torch.randn(*size, generator=generator, device=device) * scale).to(dtype)

    gate_up = normal(experts, 2 * intermediate, hidden, scale=hidden ** -0.5)
    down = normal(experts, hidden, intermediate, scale=intermediate ** -0.5)
    options = {}
    if shape.gpt_oss:
        options = dict(gate_up_bias=normal(experts, 2 * intermediate, scale=0.1), down_bias=normal(experts, hidden,
                       scale=0.1), activation=ClampedSwiGLU(shape.swiglu_alpha, shape.swiglu_limit))
    weights = {"bf16": ((gate_up, down), options, expert_bytes(shape, dtype.itemsize, False, dtype))}
    if fp8 and paths:
        with torch.device("meta"):  # no allocation: the stacks are replaced by the ones timed above
            quantized = FusedMoE(experts, hidden, intermediate)
        quantized.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
        quantized.down_proj = torch.nn.Parameter(down, requires_grad=False)
        quantized.quantize_fp8_()
        weights["fp8"] = ((quantized.gate_up_proj, quantized.down_proj),
                          dict(options, gate_up_scale=quantized.gate_up_proj_scale,
                               down_scale=quantized.down_proj_scale), expert_bytes(shape, 1, True, dtype))
    runs = []
    for batch in batch_sizes:
        x = normal(batch, hidden, scale=1.0)
        logits = normal(batch, experts, scale=1.0)
        routing = (top_k_softmax(logits, shape.top_k) if shape.gpt_oss
                   else softmax_top_k(logits, shape.top_k, renormalize=True))
        chosen = len(torch.unique(routing.expert_ids))
        run = {"batch": batch, "slots": batch * shape.top_k, "experts_read": chosen,
               "loop_ms": time_ms(lambda: fused_experts_reference(x, gate_up, down, routing, **options), device,
                                  repeats)}
        if paths:
            run["dispatch"] = "gemv" if batch * shape.top_k <= max_rows else "grouped"
        for fmt, ((w_gate_up, w_down), fmt_options, bytes_per_expert) in weights.items():
            for name, path in paths.items():
                if name == "gemv" and batch * shape.top_k > GEMV_TIMED_MAX_ROWS:
                    continue
                ms = time_ms(lambda: path(x, w_gate_up, w_down, routing, **fmt_options), device, repeats)
                prefix = name if fmt == "bf16" else f"{fmt}_{name}"
                run[f"{prefix}_ms"] = ms
                run[f"{prefix}_gb_per_s"] = bytes_per_expert * chosen / ms / 1e6
        runs.append(run)
        print(f"[experts] {json.dumps(run)}", flush=True)
    return runs


def experts_main(args, device) -> None:
    shape = EXPERT_SHAPES[args.experts]
    if args.tiny:
        shape = tiny_version(shape)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    small = args.experts == "tiny" or args.tiny
    default_batches = "1,4" if small else ("1,8,64,512" if shape.gpt_oss else "1,2,4,8,16")
    batch_sizes = [int(b) for b in (args.batch_sizes or default_batches).split(",")]
    runs = expert_runs(shape, batch_sizes, device, dtype, repeats=args.steps, fp8=args.fp8)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
               "torch": torch.__version__, "shape": args.experts, "tiny": args.tiny, **asdict(shape),
               "dtype": str(dtype), "runs": runs}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "moe_experts.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\n{args.experts}{' (tiny)' if args.tiny else ''} experts (E={shape.num_experts}, H={shape.hidden_size}, "
          f"I={shape.intermediate_size}, top-{shape.top_k}, {dtype}), one layer: the torch loop, the grouped kernel "
          f"and the GEMV path; GB/s of the distinct chosen experts' weights")
    columns = ["loop", "grouped", "gemv"] + (["fp8_grouped", "fp8_gemv"] if args.fp8 else [])
    print(f"  {'batch':>5}  {'experts':>7}  {'path':>7}" + "".join(f"  {c + ' ms':>14}  {'GB/s':>6}" for c in columns))
    for run in runs:
        cells = []
        for column in columns:
            ms, gb = run.get(f"{column}_ms"), run.get(f"{column}_gb_per_s")
            cells.append(f"  {'-' if ms is None else f'{ms:.3f}':>14}  {'-' if gb is None else f'{gb:.0f}':>6}")
        print(f"  {run['batch']:>5}  {run['experts_read']:>7}  {run.get('dispatch', '-'):>7}" + "".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="benchmarks/configs/deepseek-v3-3l")
    parser.add_argument("--experts", choices=sorted(EXPERT_SHAPES),
                        help="time one layer's experts (the grouped kernel, the GEMV path, the torch loop) instead "
                             "of MLA")
    parser.add_argument("--fp8", action="store_true", help="with --experts: the kernels on float8 experts too")
    parser.add_argument("--out", default="results/moe_mla")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny DeepSeek-V3 shape instead of --model; with --experts, the shape's routing on tiny "
                             "widths")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--context", type=int, default=None, help="tokens per sequence (8192; 128 with --tiny)")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (1,8,32; 1,2 with --tiny)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.experts and device.type == "cpu":
        # The kernels run in Triton's interpreter on a CPU; set before their module is imported (at its first use).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.experts:
        experts_main(args, device)
        return
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        config = transformers.DeepseekV3Config(**TINY)
    else:
        config = transformers.AutoConfig.from_pretrained(args.model)
    context = args.context or (128 if args.tiny else 8192)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,2" if args.tiny else "1,8,32")).split(",")]
    os.makedirs(args.out, exist_ok=True)
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                     "torch": torch.__version__, "model": "tiny" if args.tiny else args.model, "dtype": str(dtype),
                     "context": context, "variants": {}}
    model = build_model(config, dtype, device)
    init_dummy_weights(model, seed=0)
    results["weight_gib"] = sum(p.nbytes for p in model.parameters()) / 1024**3
    for variant in ("latent", "full_kv"):
        if variant == "full_kv":
            with_full_kv(model)
        runs = []
        for batch in batch_sizes:
            try:
                runs.append(decode_tokens_per_s(model, batch, context, args.block_size, args.steps, device))
            except torch.OutOfMemoryError as error:
                runs.append({"batch": batch, "error": f"out of memory: {error}"[:200]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"[{variant}] {json.dumps(runs[-1])}", flush=True)
        results["variants"][variant] = {"kv_bytes_per_token": kv_bytes_per_token(model, dtype), "runs": runs}
    with open(os.path.join(args.out, "moe_suite.json"), "w") as f:
        json.dump(results, f, indent=2)
    print_table(results)


def print_table(results: dict) -> None:
    variants = results["variants"]
    latent, full = variants["latent"]["kv_bytes_per_token"], variants["full_kv"]["kv_bytes_per_token"]
    print(f"\nDeepSeek-V3 shape ({results['model']}, {results['dtype']}), decode at {results['context']} tokens")
    print(f"  KV bytes per token (all layers): latent {latent:,}  full K/V {full:,}  ({full / latent:.1f}x)")
    print(f"  {'batch':>5}  {'latent tok/s':>13}  {'full K/V tok/s':>15}")
    for latent_run, full_run in zip(variants["latent"]["runs"], variants["full_kv"]["runs"]):
        cells = [f"{run['tokens_per_s']:.1f}" if "tokens_per_s" in run else "OOM" for run in (latent_run, full_run)]
        print(f"  {latent_run['batch']:>5}  {cells[0]:>13}  {cells[1]:>15}")


if __name__ == "__main__":
    main()
