"""Batch-1 and small-batch projections of the Llama-3-8B shape on a GPU: cuBLAS (torch's F.linear) against the
Triton GEMV (serval.kernels.triton_gemv: gemv for one row, gemv_rows for 2 to 8) over a grid of its block sizes, in
GB/s of weight read.

Each measurement replays a CUDA graph of one product per weight over enough distinct weight matrices (>= 400 MB)
that nothing is served from the 50 MB L2, as in a decode step where every weight is read once; the graph removes
launch gaps, as the engine's decode graphs do. Prints a table and writes JSON.

    python benchmarks/gemv_bench.py [--out DIR] [--dtype bfloat16] [--fp8] [--write-config] [--rows 1,2,4,5,8]
    # tuning the multi-row GEMV on one H200 (keeps the table's one-row sections):
    PYTHONPATH=/tmp/site:. python benchmarks/gemv_bench.py --rows 2,4,5,8 --write-config --out $OUT/gemv
    # two CPU cores, Triton's interpreter, tiny shapes (the script runs end to end; the times mean nothing):
    python benchmarks/gemv_bench.py --tiny --rows 1,2,5 --write-config --out /tmp/gemv_tiny

--rows: the row counts to time (default 1). More than one row: cuBLAS at the same rows against gemv_rows in both
variants (CUDA-core FMAs and tl.dot) over a small grid each; GB/s still counts the weight's bytes once.

--fp8: the Triton GEMV reads float8 weights with per-row scales (quantization="fp8"), GB/s counted in float8
bytes; cuBLAS still reads the half-precision weights (what the model does unquantized). Which float8 kernel: as
the model would take it: the float16-products one (serval.kernels.triton_fp8_gemv, the default), or with
SERVAL_FP8_GEMV_HALF=0 the float32 path; compare the two with one run each:

    PYTHONPATH=/tmp/site:. SERVAL_FP8_GEMV_HALF=0 python benchmarks/gemv_bench.py --fp8 --out $OUT/fp8_float32
    PYTHONPATH=/tmp/site:. SERVAL_FP8_GEMV_HALF=1 python benchmarks/gemv_bench.py --fp8 --out $OUT/fp8_half

--fusions: each decoder projection at this GPU's configuration, plain and as Llama's batch-1 block runs it with
the norms left pending (SERVAL_FUSED_NORM), both weight types, next to the norm kernel they replace; with
--write-config also over FUSION_GRID / FP8_FUSION_GRID, the fastest blocks written to the table's "pending_norm"
section (the other sections kept).

--count-instructions: no GPU; both float8 paths compiled for sm_90, their K loops' SASS instructions per weight
(plain and gated), for FP8_CONFIG and the float8 tables' configurations; writes fp8_gemv_instructions.json.

--write-config: both weight types in one run, and the table the kernel reads on this GPU written to
serval/kernels/configs/gemv,device=<GPU name>.json (and a copy under --out, which is what comes back from a device
call): per projection shape its fastest configuration, and as "default" (for other shapes) the one fastest over a
whole decode step of the 32-layer model. With --rows above 1 the table's "rows" section too (per row count), and
without 1 among --rows the one-row sections already in the table are kept as they are.
"""
from __future__ import annotations

import argparse
import ast
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass

# --tiny runs the kernels in Triton's interpreter, which must be chosen before triton is imported.
if "--tiny" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F

from serval.kernels import triton_gemv  # noqa: E402
from serval.kernels.triton_gemv import RowsConfig  # noqa: E402
from serval.layers import fp8  # noqa: E402
from serval.layers.activation import silu_and_mul  # noqa: E402

# (name, N, K) of Llama-3-8B's projections: merged q/k/v, o, merged gate/up, down, lm_head.
SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
          ("lm_head", 128256, 4096)]
# The projections the model runs with SwiGLU fused into the GEMV (serval.layers.linear.forward_silu_and_mul): timed
# so, since silu(gate) up is computed per tile of W and is most of the down projection's instructions.
GATED = {"down"}
GRID = list(itertools.product((2, 4, 8), (1024, 2048, 4096), (4, 8, 16)))
FP8_GRID = list(itertools.product((2, 4, 8), (2048, 4096, 8192), (4, 8, 16)))  # one byte a weight: longer K steps
# and 16 rows a program, whose threads each hold more rows: the float16 path (the default) converts a
# tile's x once for all of a thread's rows (sm_90, --count-instructions: 1.7-2.3 instructions a weight, 2.4-2.9
# gated, against 2.4 and 4.9 at (4, 2048, 4)).
FP8_GRID += [(16, 1024, 4), (16, 1024, 8), (16, 2048, 8), (16, 2048, 16)]
# gemv_rows' grid, small enough that compiling it for every row count and both weight types fits one short call:
# FMA tiles whose float32 partial sum (BLOCK_N x rows x BLOCK_K) is at most 64 registers a thread at 8 rows, and
# tensor-core tiles of 32 to 128 rows of W. float8 W: the same FMA tiles (the partial sum is float32 either way),
# twice the K per step for the tensor cores (the same bytes of shared memory per stage).
ROWS_GRID = [RowsConfig(2, 256, 4, False), RowsConfig(2, 512, 4, False), RowsConfig(4, 256, 4, False),
             RowsConfig(4, 512, 8, False), RowsConfig(8, 256, 8, False),
             RowsConfig(32, 128, 4, True, 3), RowsConfig(64, 128, 4, True, 3), RowsConfig(64, 256, 4, True, 3),
             RowsConfig(128, 128, 8, True, 3), RowsConfig(32, 256, 4, True, 4)]
FP8_ROWS_GRID = [RowsConfig(c.block_n, c.block_k * (2 if c.use_dot else 1), c.num_warps, c.use_dot, c.num_stages)
                 for c in ROWS_GRID]
TINY_SHAPES = [("qkv", 48, 64), ("down", 32, 96)]
TINY_GRID, TINY_FP8_GRID = [(2, 32, 2), (4, 64, 4)], [(2, 64, 2)]
TINY_ROWS_GRID = [RowsConfig(2, 32, 2, False), RowsConfig(16, 32, 4, True, 1)]


def time_graph(fn, weights: list[torch.Tensor], x: torch.Tensor, repeats: int = 20) -> float:
    """Seconds per product, from a graph of one product per weight replayed `repeats` times (on a CPU, --tiny: a
    plain loop, to run the script end to end)."""
    if not x.is_cuda:
        start = time.perf_counter()
        for w in weights:
            fn(x, w)
        return (time.perf_counter() - start) / len(weights)
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


def weight_copies(weight_bytes: int, device: str) -> int:
    """Distinct weights per graph: >= 400 MB, so that none is served from L2 (2 on a CPU, --tiny)."""
    return max(2, -(-400 * 2**20 // weight_bytes)) if device == "cuda" else 2


@dataclass
class GridTiming:
    cublas_s: float  # cuBLAS at the same rows, half-precision weights
    times: dict  # configuration -> seconds
    weight_bytes: int  # the Triton side's (float8 with --fp8)
    half_bytes: int


def time_grid(x: torch.Tensor, n: int, k: int, use_fp8: bool, grid, kernel, device: str, label: str,
              gated: bool = False) -> GridTiming:
    """cuBLAS and kernel(x, weight, config=, weight_scale=) over every configuration of the grid on one N x K
    projection, each checked first against cuBLAS (or, with --fp8, the product with the dequantized weight).
    gated: the Triton side takes x's first 2K columns as [gate | up] (SwiGLU fused, as the model runs the down
    projection); cuBLAS times the product with the activation alone."""
    half_bytes = n * k * x.element_size()
    weight_bytes = n * k if use_fp8 else half_bytes
    halves = [torch.randn(n, k, device=device, dtype=x.dtype) * 0.02
              for _ in range(weight_copies(weight_bytes, device))]
    xk = x[:, :k].contiguous()
    x_in = x[:, :2 * k].contiguous() if gated else xk
    if gated:
        xk = silu_and_mul(x_in)
    cublas = time_graph(lambda a, w: F.linear(a, w), halves[:weight_copies(half_bytes, device)], xk)
    # (weight, its row scales): float8 with --fp8, else the half-precision weight and None.
    weights = [fp8.quantize_weight(w) if use_fp8 else (w, None) for w in halves]
    del halves
    first, first_scale = weights[0]
    reference = (F.linear(xk.float(), first.float() * first_scale[:, None]) if use_fp8
                 else F.linear(xk, first).float())

    def run(a, weight, config):
        return kernel(a, weight[0], config=config, weight_scale=weight[1], gated=gated)
    times = {}
    for config in grid:
        got = run(x_in, weights[0], config).float()
        if not torch.allclose(got, reference, atol=5e-2, rtol=5e-2):
            raise AssertionError(f"{label} {config}: max error {(got - reference).abs().max().item()}")
        times[config] = time_graph(lambda a, w, c=config: run(a, w, c), weights, x_in)
    del weights
    empty_cache()
    return GridTiming(cublas, times, weight_bytes, half_bytes)


def bench(dtype: torch.dtype, use_fp8: bool, shapes=SHAPES, grid=None, device: str = "cuda") -> list[dict]:
    """Every configuration of the grid on every projection; one row per projection."""
    torch.manual_seed(0)
    x = torch.randn(1, 2 * max(k for _, _, k in shapes), device=device, dtype=dtype)
    grid = grid or (FP8_GRID if use_fp8 else GRID)
    rows = []
    for name, n, k in shapes:
        timing = time_grid(x, n, k, use_fp8, grid, triton_gemv.gemv, device, name, gated=name in GATED)
        results, weight_bytes = timing.times, timing.weight_bytes
        default = triton_gemv.FP8_CONFIG if use_fp8 else triton_gemv.DEFAULT_CONFIG
        if default not in results:  # --tiny's grid
            default = grid[0]
        best = min(results, key=results.get)
        rows.append({"name": name, "N": n, "K": k, "mb": weight_bytes / 1e6,
                     "cublas_us": timing.cublas_s * 1e6, "cublas_gbs": timing.half_bytes / timing.cublas_s / 1e9,
                     "default_config": list(default), "default_us": results[default] * 1e6,
                     "default_gbs": weight_bytes / results[default] / 1e9,
                     "best_config": list(best), "best_us": results[best] * 1e6,
                     "best_gbs": weight_bytes / results[best] / 1e9,
                     "all_us": {str(c): t * 1e6 for c, t in results.items()}})
    return rows


def empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_rows(dtype: torch.dtype, use_fp8: bool, m: int, shapes=SHAPES, grid=None,
               device: str = "cuda") -> list[dict]:
    """gemv_rows over its grid against cuBLAS at m rows, on every projection; one result per projection."""
    torch.manual_seed(m)
    x = torch.randn(m, 2 * max(k for _, _, k in shapes), device=device, dtype=dtype)
    grid = grid or (FP8_ROWS_GRID if use_fp8 else ROWS_GRID)
    results = []
    for name, n, k in shapes:
        timing = time_grid(x, n, k, use_fp8, grid, triton_gemv.gemv_rows, device, f"{name} rows={m}",
                           gated=name in GATED)
        times, weight_bytes = timing.times, timing.weight_bytes
        best = {}
        for use_dot in (False, True):
            variant = [c for c in times if c.use_dot == use_dot]
            best[use_dot] = min(variant, key=times.get) if variant else None
        overall = min(times, key=times.get)
        results.append({
            "name": name, "N": n, "K": k, "rows": m, "mb": weight_bytes / 1e6,
            "cublas_us": timing.cublas_s * 1e6, "cublas_gbs": timing.half_bytes / timing.cublas_s / 1e9,
            **{f"{label}_config": best[use_dot].as_list() if best[use_dot] else None
               for label, use_dot in (("fma", False), ("dot", True))},
            **{f"{label}_us": times[best[use_dot]] * 1e6 if best[use_dot] else None
               for label, use_dot in (("fma", False), ("dot", True))},
            "best_config": overall.as_list(), "best_us": times[overall] * 1e6,
            "best_gbs": weight_bytes / times[overall] / 1e9,
            "all_us": {json.dumps(c.as_list()): t * 1e6 for c, t in times.items()}})
    return results


def tuned_rows_table(results: list[dict]) -> dict[str, RowsConfig]:
    """As tuned_table, for one row count of gemv_rows."""
    table = {triton_gemv.shape_key(r["N"], r["K"]): RowsConfig.from_list(r["best_config"]) for r in results}
    step_us = {c: sum(step_weight(r["name"]) * r["all_us"][c] for r in results) for c in results[0]["all_us"]}
    table["default"] = RowsConfig.from_list(json.loads(min(step_us, key=step_us.get)))
    return table


def print_rows_results(results: list[dict], dtype_name: str, use_fp8: bool) -> None:
    m = results[0]["rows"]
    print(f"\n{m} rows, dtype {dtype_name}, Triton weights {'float8 e4m3' if use_fp8 else dtype_name} "
          f"(GB/s: weight bytes read once / time; config [BLOCK_N, BLOCK_K, warps, dot, stages])")
    print(f"{'proj':8} {'N x K':>13} | {'cuBLAS us':>9} {'GB/s':>6} | {'FMA us':>7} | {'dot us':>7} | "
          f"{'best config':>22} {'us':>7} {'GB/s':>6}")

    def us(value):
        return f"{value:7.1f}" if value is not None else f"{'-':>7}"
    for r in results:
        print(f"{r['name']:8} {r['N']:>6}x{r['K']:<6} | {r['cublas_us']:9.1f} {r['cublas_gbs']:6.0f} | "
              f"{us(r['fma_us'])} | {us(r['dot_us'])} | {str(r['best_config']):>22} {r['best_us']:7.1f} "
              f"{r['best_gbs']:6.0f}")
    for key in ("cublas_us", "best_us"):
        total = sum(step_weight(r["name"]) * r[key] for r in results)
        print(f"one {m}-row step's projections, {key[:-3]}: {total / 1e3:.3f} ms")


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
    print(f"device: {device_name()}, dtype {dtype_name}, batch 1, Triton weights "
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


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def existing_table(name: str) -> dict:
    """The table already under serval/kernels/configs/ for this GPU ({} if none): sections not re-tuned are kept."""
    return triton_gemv.load_table(os.path.join(triton_gemv.CONFIG_DIR, name)) or {}


def fp8_loop_instructions(config: tuple[int, int, int], gated: bool, half: bool, norm: bool = False) -> dict:
    """The batch-1 float8 GEMV (bfloat16 x, row scales) compiled for sm_90 with no GPU (quant_kernel_tune's
    compiled_k_loop): its K loop's SASS instructions per weight a thread handles. half: the float16-products kernel
    (serval.kernels.triton_fp8_gemv), else triton_gemv's float32 path. gated: the down projection, which also adds
    the residual and starts the next norm; norm: a projection that finishes a pending norm (a decode block's
    GEMVs as Llama runs them at batch 1)."""
    from benchmarks.quant_kernel_tune import compiled_k_loop
    from serval.kernels import triton_fp8_gemv
    block_n, block_k, num_warps = config
    pointers = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "bias_ptr": "*fp8e4nv",
                "y_ptr": "*bf16", "residual_ptr": "*bf16", "norm_ptr": "*bf16", "scaled_ptr": "*bf16",
                "sums_out_ptr": "*fp32", "sums_ptr": "*fp32"}
    constants = dict(HAS_BIAS=False, GATED=gated, RESIDUAL=gated, NEXT_NORM=gated, NORMED=norm,
                     SUMS_BLOCK=512 if norm else 1, EVEN_K=True, BLOCK_N=block_n, BLOCK_K=block_k, USE_PDL=False)
    if half:
        kernel = triton_fp8_gemv._fp8_half_gemv_kernel
        constants.update(X_BLOCK=triton_fp8_gemv.X_PASS_BLOCK, FLUSH=triton_fp8_gemv.FLUSH_TILES, USE_ASM=True)
    else:
        kernel = triton_gemv._gemv_kernel
        constants.update(HAS_SCALE=True)
    loop = compiled_k_loop(kernel, pointers | {"eps": "fp32"}, constants, [*pointers, "N", "K", "stride_w"],
                           num_warps, 1)
    weights = block_n * block_k / (32 * num_warps)  # one tile an iteration
    return {"config": list(config), "gated": gated, "norm": norm, "half": half,
            "loop_instructions": loop["loop_instructions"],
            "weights_per_thread": weights, "per_weight": loop["loop_instructions"] / weights,
            "registers": loop["registers"], "stack_bytes": loop["stack_bytes"], "opcodes": loop["opcodes"]}


def count_instructions(out: str) -> None:
    """--count-instructions: both float8 paths' K loops, plain and gated (the down projection with SwiGLU fused),
    for FP8_CONFIG and every block configuration of the float8 tables under serval/kernels/configs/."""
    configs = {triton_gemv.FP8_CONFIG}
    for name in sorted(os.listdir(triton_gemv.CONFIG_DIR)):
        if name.startswith("gemv,"):
            table = triton_gemv.load_table(os.path.join(triton_gemv.CONFIG_DIR, name)) or {}
            configs |= {tuple(c) for c in (table.get(triton_gemv.FLOAT8) or {}).values()}
    rows = []
    print(f"{'config':<16} {'gated':>5} | {'float32 path':>12} {'regs':>4} | {'float16 path':>12} {'regs':>4}  "
          f"top opcodes (float16)  [SASS instructions per weight, sm_90]")
    for config in sorted(configs):
        for gated in (False, True):
            before, after = (fp8_loop_instructions(config, gated, half) for half in (False, True))
            rows += [before, after]
            top = ", ".join(f"{op} {count}" for op, count in list(after["opcodes"].items())[:5])
            print(f"{str(config):<16} {str(gated):>5} | {before['per_weight']:12.2f} {before['registers']:>4} | "
                  f"{after['per_weight']:12.2f} {after['registers']:>4}  {top}", flush=True)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "fp8_gemv_instructions.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"\nwrote {os.path.join(out, 'fp8_gemv_instructions.json')}")


# --fusions --write-config: the blocks tried for the GEMVs of a block with pending norms (more rows a program than
# the plain GEMV's best: each program reduces the norm's sums once, whatever its rows).
FUSION_GRID = list(itertools.product((4, 8, 16), (1024, 2048), (4, 8)))
FP8_FUSION_GRID = list(itertools.product((8, 16), (1024, 2048), (4, 8)))


def bench_fusions(dtype: torch.dtype, use_fp8: bool, shapes=SHAPES, device: str = "cuda",
                  grid: list | None = None) -> list[dict]:
    """--fusions: each decoder projection at this GPU's configuration, plain and as a batch-1 block runs it with
    the norms left pending (Llama's _layers_one_row: qkv and gate_up finish a norm, o and down add the residual and
    start the next one; serval.kernels.triton_gemv.PendingNorm), and the norm kernel they replace (residual add
    and RMSNorm of one row, serval.kernels.triton_fused.rms_norm). Microseconds per product from CUDA graphs.
    grid: also the fused GEMV at each of these blocks, the fastest kept as the row's best_config."""
    from serval.kernels import triton_fused
    torch.manual_seed(0)
    hidden = next(k for name, _, k in shapes if name == "qkv")
    x = torch.randn(1, 2 * max(k for _, _, k in shapes), device=device, dtype=dtype)
    stream = torch.randn(1, max(n for name, n, _ in shapes if name != "lm_head"), device=device, dtype=dtype)
    norm_weight = torch.rand(stream.shape[1], device=device, dtype=dtype) + 0.5
    pending = triton_gemv.PendingNorm(x[:, :hidden].contiguous(), torch.rand(512, device=device), 1e-5)
    row = stream[:, :hidden].contiguous()
    norm_us = time_graph(lambda a, w: triton_fused.rms_norm(a, w, norm_weight[:hidden], 1e-5), [row, row * 2],
                         row) * 1e6
    rows = []
    for name, n, k in shapes:
        if name == "lm_head":
            continue
        gated = name in GATED
        x_in = x[:, :2 * k if gated else k].contiguous()
        halves = [torch.randn(n, k, device=device, dtype=dtype) * 0.02
                  for _ in range(weight_copies(n * k * (1 if use_fp8 else 2), device))]
        weights = [fp8.quantize_weight(w) if use_fp8 else (w, None) for w in halves]
        del halves
        plain_us = time_graph(lambda a, w: triton_gemv.gemv(a, w[0], weight_scale=w[1], gated=gated), weights,
                              x_in) * 1e6

        def fused(a, w, config=None):
            if name in ("qkv", "gate_up"):
                return triton_gemv.gemv(None, w[0], weight_scale=w[1], normed=pending, config=config)
            return triton_gemv.gemv_add_norm(a, w[0], stream[:, :n], norm_weight[:n], 1e-5, weight_scale=w[1],
                                             gated=gated, config=config)
        fused_us = time_graph(fused, weights, x_in) * 1e6
        residual_us = None
        if name not in ("qkv", "gate_up"):
            residual_us = time_graph(lambda a, w: triton_gemv.gemv(a, w[0], weight_scale=w[1], gated=gated,
                                                                   residual=stream[:, :n]), weights, x_in) * 1e6
        tuned = {config: time_graph(lambda a, w, c=config: fused(a, w, c), weights, x_in) * 1e6
                 for config in grid or []}
        best = min(tuned, key=tuned.get) if tuned else None
        del weights
        empty_cache()
        rows.append({"name": name, "N": n, "K": k, "config": list(triton_gemv.get_config(n, k, use_fp8, x.device)),
                     "plain_us": plain_us, "fused_us": fused_us, "residual_only_us": residual_us,
                     "norm_kernel_us": norm_us, "best_config": list(best) if best else None,
                     "best_us": tuned[best] if best else None})
    print(f"\n{'fp8' if use_fp8 else str(dtype).split('.')[-1]} weights, batch 1: plain GEMV, as the block with "
          f"pending norms runs it, and the norm kernel it replaces ({norm_us:.2f} us)")
    print(f"{'projection':<10} {'config':<16} {'plain us':>9} {'fused us':>9} {'+ residual only':>15} "
          f"{'best fused':>16} {'us':>7}")
    for row in rows:
        residual = f"{row['residual_only_us']:15.2f}" if row["residual_only_us"] is not None else f"{'-':>15}"
        best = (f"{str(tuple(row['best_config'])):>16} {row['best_us']:7.2f}" if row["best_config"]
                else f"{'-':>16} {'-':>7}")
        print(f"{row['name']:<10} {str(tuple(row['config'])):<16} {row['plain_us']:9.2f} {row['fused_us']:9.2f} "
              f"{residual} {best}")
    return rows


def write_pending_norm_section(results: dict, out: str, tiny: bool) -> None:
    """This GPU's table with its PENDING_NORM section set to --fusions' best blocks, the other sections kept
    (under --out too; --tiny: only there)."""
    name = triton_gemv.config_file_name(device_name() if not tiny else "cpu")
    table = {} if tiny else existing_table(name)
    table[triton_gemv.PENDING_NORM] = dict(table.get(triton_gemv.PENDING_NORM) or {}) | {
        section: {triton_gemv.shape_key(row["N"], row["K"]): row["best_config"] for row in results[kind]}
        for kind, section in (("half", triton_gemv.HALF), ("fp8", triton_gemv.FLOAT8)) if kind in results}
    text = json.dumps(table, indent=1)
    paths = [os.path.join(out, name.replace("=", "_"))] + ([] if tiny else [os.path.join(triton_gemv.CONFIG_DIR,
                                                                                            name)])
    for path in paths:
        with open(path, "w") as f:
            f.write(text + "\n")
    print(f"\n{name}'s {triton_gemv.PENDING_NORM} section written to {', '.join(paths)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results")
    parser.add_argument("--dtype", default=None, help="default bfloat16 (float16 with --tiny: Triton's "
                        "interpreter multiplies bfloat16 wrongly in tl.dot)")
    parser.add_argument("--fp8", action="store_true", help="float8 weights for the Triton GEMV")
    parser.add_argument("--write-config", action="store_true",
                        help="both weight types, and this GPU's table under serval/kernels/configs/")
    parser.add_argument("--rows", default="1", help="comma-separated row counts, e.g. 1,2,4,5,8 (2..8: gemv_rows)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes and grids on the CPU in Triton's interpreter (runs the script end to end)")
    parser.add_argument("--count-instructions", action="store_true",
                        help="no timing, no GPU: the float8 GEMV's K loop compiled for sm_90, SASS instructions per "
                             "weight of the float32 and the float16-products path")
    parser.add_argument("--fusions", action="store_true",
                        help="each projection plain and as a batch-1 block with pending norms runs it (both weight "
                             "types), against the norm kernel it replaces")
    parser.add_argument("--fusion-kinds", default="half,fp8", help="--fusions: half, fp8 or both")
    args = parser.parse_args()
    if args.count_instructions:
        return count_instructions(args.out)
    if args.fusions:
        dtype = getattr(torch, args.dtype or ("float16" if args.tiny else "bfloat16"))
        shapes, device = (TINY_SHAPES + [("gate_up", 96, 64), ("o", 64, 48)], "cpu") if args.tiny else (SHAPES, "cuda")
        grids = ({"half": TINY_GRID, "fp8": TINY_FP8_GRID} if args.tiny
                 else {"half": FUSION_GRID, "fp8": FP8_FUSION_GRID})
        results = {kind: bench_fusions(dtype, kind == "fp8", shapes, device,
                                       grids[kind] if args.write_config else None)
                   for kind in args.fusion_kinds.split(",")}
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gemv_fusions.json"), "w") as f:
            json.dump({"device": device_name() if not args.tiny else "cpu", "dtype": str(dtype), **results}, f,
                      indent=1)
        if args.write_config:
            write_pending_norm_section(results, args.out, args.tiny)
        return None
    dtype_name = args.dtype or ("float16" if args.tiny else "bfloat16")
    dtype = getattr(torch, dtype_name)
    row_counts = sorted({int(v) for v in args.rows.split(",")})
    device = "cpu" if args.tiny else "cuda"
    shapes = TINY_SHAPES if args.tiny else SHAPES
    name_of_device = device_name() if not args.tiny else "cpu"
    os.makedirs(args.out, exist_ok=True)
    kinds = (False, True) if args.write_config else (args.fp8,)
    tables, rows_tables = {}, {False: {}, True: {}}
    for use_fp8 in kinds:
        suffix = "_fp8" if use_fp8 else ""
        if 1 in row_counts:
            grid = (TINY_FP8_GRID if use_fp8 else TINY_GRID) if args.tiny else None
            rows = bench(dtype, use_fp8, shapes, grid, device)
            print_rows(rows, dtype_name, use_fp8)
            tables[use_fp8] = tuned_table(rows)
            with open(os.path.join(args.out, f"gemv_bench{suffix}.json"), "w") as f:
                json.dump({"device": name_of_device, "dtype": dtype_name, "fp8_weights": use_fp8, "rows": rows,
                           "tuned": {k: list(v) for k, v in tables[use_fp8].items()}}, f, indent=1)
        results = []
        for m in (m for m in row_counts if m > 1):
            per_shape = bench_rows(dtype, use_fp8, m, shapes, TINY_ROWS_GRID if args.tiny else None, device)
            print_rows_results(per_shape, dtype_name, use_fp8)
            rows_tables[use_fp8][m] = tuned_rows_table(per_shape)
            results += per_shape
        if results:
            with open(os.path.join(args.out, f"gemv_bench_rows{suffix}.json"), "w") as f:
                json.dump({"device": name_of_device, "dtype": dtype_name, "fp8_weights": use_fp8, "results": results,
                           "tuned": {m: {k: c.as_list() for k, c in t.items()} for m, t in
                                     rows_tables[use_fp8].items()}}, f, indent=1)
    if args.write_config:
        name = triton_gemv.config_file_name(name_of_device)
        old = {} if args.tiny else existing_table(name)
        table = json.loads(triton_gemv.config_table_json(tables.get(False, {}), tables.get(True, {}), name_of_device,
                                                         rows_tables[False], rows_tables[True]))
        for section in (triton_gemv.HALF, triton_gemv.FLOAT8, triton_gemv.ROWS):
            if not table.get(section) and old.get(section):
                table[section] = old[section]  # not re-tuned in this run
        text = json.dumps(table, indent=1)
        # The copy under --out has no "=" in its name: a device call brings back only plain names. --tiny's CPU
        # numbers go under --out only.
        paths = [os.path.join(args.out, name.replace("=", "_"))]
        if not args.tiny:
            paths.append(os.path.join(triton_gemv.CONFIG_DIR, name))
        for path in paths:
            with open(path, "w") as f:
                f.write(text + "\n")
        print(f"\n{name} written to {', '.join(paths)}:\n{text}")

if __name__ == "__main__":
    main()
