"""GGUF weights kept in their blocks on a GPU (serval.kernels.triton_gguf) against half-precision weights, on the
projections of the Llama-3-8B shape: batch-1 GEMV time, GB/s of weight bytes read, and the decode rate the
projections of a 32-layer model allow (tok/s = 1 / (32 x the four projections' time)); next to them the bf16 Triton
GEMV (serval.kernels.triton_gemv) and torch's F.linear (cuBLAS) on bf16 weights ("torch" in the table).
Optionally more rows (--rows 16,512: the small-batch GEMM and the prefill GEMM) and a grid of GEMV configurations
per type (--tune; for Q4_K at batch 1 the generic GEMV's grid and the word-reading q4_k_gemv's, whose default is
the table's "us").

Weights are random GGUF blocks with sane fp16 scales (no checkpoint needed); each product is checked against the
numpy dequantizer on its first 64 output rows before it is timed. On a GPU each time comes from a CUDA graph of one
product per weight copy over >= 400 MB of copies (nothing served from L2, as in a decode step). Prints a table and
writes JSON.

    PYTHONPATH=/tmp/site:. python benchmarks/gguf_gpu_bench.py [--types Q4_K,Q4_1,Q6_K,Q8_0,Q4_0,Q5_0]
        [--rows 1,16,512] [--tune] [--out results/gguf_gpu_bench]
    python benchmarks/gguf_gpu_bench.py --device cpu --tiny     # small shapes in Triton's interpreter
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import gguf
import torch
import torch.nn.functional as F

Q = gguf.GGMLQuantizationType
# (name, N, K) of Llama-3-8B's decode projections as Serval runs them: merged q/k/v and gate/up.
SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
TINY_SHAPES = [("qkv", 96, 512), ("o", 64, 512), ("gate_up", 160, 512), ("down", 64, 768)]
LAYERS = 32
# The fp16 fields of each type's block (byte offsets) and the largest scale that keeps weights near 0.02..0.2.
SCALE_FIELDS = {Q.Q8_0: ((0,), 1e-3), Q.Q4_0: ((0,), 1e-2), Q.Q4_1: ((0, 2), 1e-2), Q.Q5_0: ((0,), 5e-3),
                Q.Q5_1: ((0, 2), 5e-3), Q.Q4_K: ((0, 2), 2e-4), Q.Q5_K: ((0, 2), 1e-4), Q.Q6_K: ((208,), 5e-5)}
GEMV_GRID = list(itertools.product((8, 16, 32), (256, 512), (2, 4, 8)))
Q4_K_GRID = list(itertools.product((4, 8, 16, 32, 64), (1, 2, 4, 8)))  # (BLOCK_N, num_warps) of q4_k_gemv


def random_blocks(qtype: Q, n: int, k: int, device: str, seed: int) -> torch.Tensor:
    """uint8 [n, bytes per row] of random GGUF blocks with small positive fp16 scales."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    generator = torch.Generator(device=device).manual_seed(seed)
    blocks = torch.randint(0, 256, (n * k // block_size, type_size), dtype=torch.uint8, device=device,
                           generator=generator)
    offsets, limit = SCALE_FIELDS[qtype]
    for offset in offsets:
        scales = (torch.rand(len(blocks), device=device, generator=generator) * limit).half()
        blocks[:, offset:offset + 2] = scales.view(torch.uint8).view(-1, 2)
    return blocks.view(n, -1)


def time_products(fn, weights: list[torch.Tensor], x: torch.Tensor, repeats: int) -> float:
    """Seconds per product: a CUDA graph of one product per weight, replayed (gemv_bench's timing); on the CPU,
    plain calls."""
    if x.device.type == "cuda":
        from gemv_bench import time_graph  # benchmarks/, the script's own directory
        return time_graph(fn, weights, x, repeats)
    fn(x, weights[0])
    start = time.perf_counter()
    for _ in range(repeats):
        for w in weights:
            fn(x, w)
    return (time.perf_counter() - start) / (repeats * len(weights))


def copies_for(nbytes: int, device: str) -> int:
    return max(2, -(-400 * 2**20 // nbytes)) if device == "cuda" else 1


def check(qtype: Q, blocks: torch.Tensor, x: torch.Tensor, got: torch.Tensor, label: str) -> None:
    from serval.kernels import triton_gguf
    rows = min(64, blocks.shape[0])
    expected = triton_gguf.reference_linear(x.float(), blocks[:rows], qtype)
    error = float((got[:, :rows].float() - expected).abs().max())
    if error > 2e-2 * float(expected.abs().max()) + 1e-3:
        raise AssertionError(f"{label}: max error {error} against the dequantized product")


def bench_shape(name: str, n: int, k: int, types: list[Q], rows: list[int], dtype: torch.dtype, device: str,
                tune: bool, repeats: int) -> list[dict]:
    from serval.kernels import triton_gemv, triton_gguf
    results = []
    half_bytes = n * k * 2
    halves = [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(copies_for(half_bytes, device))]
    for m in rows:
        x = torch.randn(m, k, device=device, dtype=dtype)
        row = {"shape": name, "N": n, "K": k, "rows": m, "bf16_mb": half_bytes / 1e6,
               "cublas_us": time_products(lambda a, w: F.linear(a, w), halves, x, repeats) * 1e6}
        if m == 1 and device == "cuda":
            row["bf16_gemv_us"] = time_products(lambda a, w: triton_gemv.gemv(a, w), halves, x, repeats) * 1e6
        for qtype in types:
            qk, type_size = gguf.GGML_QUANT_SIZES[qtype]
            nbytes = n * k // qk * type_size
            weights = [random_blocks(qtype, n, k, device, seed) for seed in range(copies_for(nbytes, device))]
            check(qtype, weights[0], x, triton_gguf.matmul(x, weights[0], qtype), f"{name} {qtype.name} x{m}")
            seconds = time_products(lambda a, w: triton_gguf.matmul(a, w, qtype), weights, x, repeats)
            entry = {"mb": nbytes / 1e6, "us": seconds * 1e6, "gb_s": nbytes / seconds / 1e9}
            if tune and m <= triton_gguf.GEMV_MAX_ROWS:
                entry["grid_us"] = {}
                for config in GEMV_GRID if device == "cuda" else GEMV_GRID[:4:3]:
                    if config[1] % qk:
                        continue
                    try:
                        entry["grid_us"][str(config)] = time_products(
                            lambda a, w, c=config: triton_gguf.matmul(a, w, qtype, gemv_config=c),
                            weights, x, repeats) * 1e6
                    except Exception:  # noqa: BLE001 - a configuration past the device's limits is skipped
                        continue
                if qtype == Q.Q4_K and m == 1:  # its own batch-1 kernel (the default above), over its own grid
                    for config in Q4_K_GRID if device == "cuda" else Q4_K_GRID[:1]:
                        entry["grid_us"][f"q4_k_gemv {config}"] = time_products(
                            lambda a, w, c=config: triton_gguf.q4_k_gemv(a, w, c), weights, x, repeats) * 1e6
                best = min(entry["grid_us"], key=entry["grid_us"].get)
                entry["best_config"], entry["best_us"] = best, entry["grid_us"][best]
            row[qtype.name] = entry
            del weights
        results.append(row)
        print_row(row, types)
    del halves
    if device == "cuda":
        torch.cuda.empty_cache()
    return results


def print_row(row: dict, types: list[Q]) -> None:
    gemv = f" bf16 GEMV {row['bf16_gemv_us']:8.1f} us |" if "bf16_gemv_us" in row else ""
    cells = " | ".join(f"{t.name} {row[t.name]['us']:8.1f} us {row[t.name]['gb_s']:6.0f} GB/s"
                       + (f" (best {row[t.name]['best_us']:.1f} {row[t.name]['best_config']})"
                          if "best_us" in row[t.name] else "") for t in types)
    print(f"{row['shape']:8} {row['N']:>6}x{row['K']:<6} x{row['rows']:<4} | torch {row['cublas_us']:8.1f} us |"
          f"{gemv} {cells}", flush=True)


def decode_rates(results: list[dict], types: list[Q]) -> dict[str, float]:
    """tok/s that batch-1 decode's projections allow: 1 / (LAYERS x the four projections' time)."""
    single = [r for r in results if r["rows"] == 1]
    rates = {"torch_dense": 1e6 / (LAYERS * sum(r["cublas_us"] for r in single))}
    if all("bf16_gemv_us" in r for r in single):
        rates["triton_gemv_bf16"] = 1e6 / (LAYERS * sum(r["bf16_gemv_us"] for r in single))
    for qtype in types:
        rates[qtype.name] = 1e6 / (LAYERS * sum(r[qtype.name]["us"] for r in single))
        if all("best_us" in r[qtype.name] for r in single):
            rates[f"{qtype.name}_best"] = 1e6 / (LAYERS * sum(r[qtype.name]["best_us"] for r in single))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="small shapes (the interpreter on the CPU)")
    parser.add_argument("--types", default="Q4_K,Q4_1,Q6_K,Q8_0,Q4_0,Q5_0")
    parser.add_argument("--rows", default="1", help="comma-separated rows of x: 1 (decode), 16, 512 (prefill)")
    parser.add_argument("--tune", action="store_true", help="a grid of GEMV configurations per type at batch 1")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default="results/gguf_gpu_bench")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is first imported, below
        if not args.tiny:
            parser.error("--device cpu runs Triton's interpreter: add --tiny")
    dtype = getattr(torch, args.dtype) if args.device == "cuda" else torch.float32
    types = [Q[name] for name in args.types.split(",")]
    rows = [int(r) for r in args.rows.split(",")]
    shapes = TINY_SHAPES if args.tiny else SHAPES
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter)"
    print(f"device: {device_name}, x {dtype}, GGUF types {args.types}, shapes {'tiny' if args.tiny else 'Llama-3-8B'}")
    results = []
    for name, n, k in shapes:
        results.extend(bench_shape(name, n, k, types, rows, dtype, args.device, args.tune,
                                   repeats=20 if args.device == "cuda" else 1))
    rates = decode_rates(results, types)
    print(f"\nbatch-1 decode rate the projections of {LAYERS} layers allow (tok/s):")
    for key, rate in rates.items():
        print(f"  {key:18} {rate:10.1f}")
    bytes_per_weight = {t.name: gguf.GGML_QUANT_SIZES[t][1] / gguf.GGML_QUANT_SIZES[t][0] for t in types}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gguf_gpu_bench.json")
    with open(path, "w") as f:
        json.dump({"device": device_name, "dtype": str(dtype), "tiny": args.tiny, "layers": LAYERS,
                   "bytes_per_weight": bytes_per_weight, "rows": results, "decode_tok_s": rates}, f, indent=1)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
