"""Batch-1 projections of the Llama-3-8B shape on a GPU: cuBLAS (torch's F.linear) against the Triton GEMV
(serval.kernels.triton_gemv) over a grid of its block sizes, in GB/s of weight read.

Each measurement replays a CUDA graph of one product per weight over enough distinct weight matrices (>= 400 MB)
that nothing is served from the 50 MB L2, as in a decode step where every weight is read once; the graph removes
launch gaps, as the engine's decode graphs do. Prints a table and writes JSON.

    python benchmarks/gemv_bench.py [--out DIR] [--dtype bfloat16] [--fp8] [--write-config]

--fp8: the Triton GEMV reads float8 weights with per-row scales (quantization="fp8"), GB/s counted in float8
bytes; cuBLAS still reads the half-precision weights (what the model does unquantized).

--write-config: both weight types in one run, and the table the kernel reads on this GPU written to
serval/kernels/configs/gemv,device=<GPU name>.json (and a copy under --out, which is what comes back from a device
call): per projection shape its fastest configuration, and as "default" (for other shapes) the one fastest over a
whole decode step of the 32-layer model.
"""
from __future__ import annotations

import argparse
import ast
import itertools
import json
import os

import torch
import torch.nn.functional as F

from serval.kernels import triton_gemv
from serval.layers import fp8

# (name, N, K) of Llama-3-8B's projections: merged q/k/v, o, merged gate/up, down, lm_head.
SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
          ("lm_head", 128256, 4096)]
GRID = list(itertools.product((2, 4, 8), (1024, 2048, 4096), (4, 8, 16)))
FP8_GRID = list(itertools.product((2, 4, 8), (2048, 4096, 8192), (4, 8, 16)))  # one byte a weight: longer K steps


def time_graph(fn, weights: list[torch.Tensor], x: torch.Tensor, repeats: int = 20) -> float:
    """Seconds per product, from a graph of one product per weight replayed `repeats` times."""
    for w in weights[:2]:
        fn(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(x, w)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / (repeats * len(weights))


def bench(dtype: torch.dtype, use_fp8: bool) -> list[dict]:
    """Every configuration of the grid on every projection; one row per projection."""
    torch.manual_seed(0)
    x = torch.randn(1, 14336, device="cuda", dtype=dtype)
    rows = []
    for name, n, k in SHAPES:
        half_bytes = n * k * x.element_size()
        weight_bytes = n * k if use_fp8 else half_bytes
        copies = max(2, -(-400 * 2**20 // weight_bytes))
        halves = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(copies)]
        xk = x[:, :k].contiguous()
        cublas = time_graph(lambda a, w: F.linear(a, w), halves[:max(2, -(-400 * 2**20 // half_bytes))], xk)
        # (weight, its row scales): float8 with --fp8, else the half-precision weight and None.
        weights = [fp8.quantize_weight(w) if use_fp8 else (w, None) for w in halves]
        del halves
        first, first_scale = weights[0]
        # Checked against cuBLAS, or with --fp8 against the product with the dequantized weight.
        reference = (F.linear(xk.float(), first.float() * first_scale[:, None]) if use_fp8
                     else F.linear(xk, first).float())

        def gemv(a, weight, c):
            return triton_gemv.gemv(a, weight[0], config=c, weight_scale=weight[1])
        results = {}
        for config in FP8_GRID if use_fp8 else GRID:
            got = gemv(xk, weights[0], config).float()
            if not torch.allclose(got, reference, atol=5e-2, rtol=5e-2):
                raise AssertionError(f"{name} {config}: max error {(got - reference).abs().max().item()}")
            results[config] = time_graph(lambda a, w, c=config: gemv(a, w, c), weights, xk)
        default = triton_gemv.FP8_CONFIG if use_fp8 else triton_gemv.DEFAULT_CONFIG
        best = min(results, key=results.get)
        rows.append({"name": name, "N": n, "K": k, "mb": weight_bytes / 1e6,
                     "cublas_us": cublas * 1e6, "cublas_gbs": half_bytes / cublas / 1e9,
                     "default_config": list(default), "default_us": results[default] * 1e6,
                     "default_gbs": weight_bytes / results[default] / 1e9,
                     "best_config": list(best), "best_us": results[best] * 1e6,
                     "best_gbs": weight_bytes / results[best] / 1e9,
                     "all_us": {str(c): t * 1e6 for c, t in results.items()}})
        del weights
        torch.cuda.empty_cache()
    return rows


def step_weight(name: str) -> int:
    """How often a decode step of the 32-layer model runs the projection."""
    return 1 if name == "lm_head" else 32


def tuned_table(rows: list[dict]) -> dict[str, tuple[int, int, int]]:
    """Per shape its fastest configuration; "default": the one with the shortest decode step over all shapes."""
    table = {triton_gemv.shape_key(r["N"], r["K"]): tuple(r["best_config"]) for r in rows}
    configs = rows[0]["all_us"].keys()
    step_us = {c: sum(step_weight(r["name"]) * r["all_us"][c] for r in rows) for c in configs}
    table["default"] = ast.literal_eval(min(step_us, key=step_us.get))
    return table


def print_rows(rows: list[dict], dtype_name: str, use_fp8: bool) -> None:
    print(f"device: {torch.cuda.get_device_name()}, dtype {dtype_name}, batch 1, Triton weights "
          f"{'float8 e4m3' if use_fp8 else dtype_name}")
    print(f"{'proj':8} {'N x K':>13} {'MB':>7} | {'cuBLAS us':>9} {'GB/s':>6} | {'Triton default':>15} {'us':>7} "
          f"{'GB/s':>6} | {'best config':>15} {'us':>7} {'GB/s':>6}")
    for r in rows:
        print(f"{r['name']:8} {r['N']:>6}x{r['K']:<6} {r['mb']:7.1f} | {r['cublas_us']:9.1f} {r['cublas_gbs']:6.0f} | "
              f"{str(tuple(r['default_config'])):>15} {r['default_us']:7.1f} {r['default_gbs']:6.0f} | "
              f"{str(tuple(r['best_config'])):>15} {r['best_us']:7.1f} {r['best_gbs']:6.0f}")
    # Per decode step of the 32-layer model: 32 x (qkv + o + gate_up + down) + lm_head.
    for key in ("cublas_us", "default_us", "best_us"):
        total = sum(step_weight(r["name"]) * r[key] for r in rows)
        print(f"one decode step's projections, {key[:-3]}: {total / 1e3:.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--fp8", action="store_true", help="float8 weights for the Triton GEMV")
    parser.add_argument("--write-config", action="store_true",
                        help="both weight types, and this GPU's table under serval/kernels/configs/")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    device_name = torch.cuda.get_device_name()
    os.makedirs(args.out, exist_ok=True)
    kinds = (False, True) if args.write_config else (args.fp8,)
    tables = {}
    for use_fp8 in kinds:
        rows = bench(dtype, use_fp8)
        print_rows(rows, args.dtype, use_fp8)
        tables[use_fp8] = tuned_table(rows)
        name = "gemv_bench_fp8.json" if use_fp8 else "gemv_bench.json"
        with open(os.path.join(args.out, name), "w") as f:
            json.dump({"device": device_name, "dtype": args.dtype, "fp8_weights": use_fp8, "rows": rows,
                       "tuned": {k: list(v) for k, v in tables[use_fp8].items()}}, f, indent=1)
    if args.write_config:
        text = triton_gemv.config_table_json(tables[False], tables[True], device_name)
        name = triton_gemv.config_file_name(device_name)
        # The copy under --out has no "=" in its name: a device call brings back only plain names.
        for path in (os.path.join(triton_gemv.CONFIG_DIR, name), os.path.join(args.out, name.replace("=", "_"))):
            with open(path, "w") as f:
                f.write(text + "\n")
        print(f"\n{name} written under serval/kernels/configs/ and {args.out}:\n{text}")


if __name__ == "__main__":
    main()
