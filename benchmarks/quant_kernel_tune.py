"""Time the quantized batch-1 kernels over a grid of configurations on this GPU, for the projections of one model
shape: the block-FP8 GEMV (serval.kernels.triton_gemv.block_scaled_gemv) and the W4A16 grouped GEMV and GEMM
(serval.kernels.triton_w4a16). Prints, per projection, the default configuration's time and GB/s of weights read,
and the fastest configuration's; writes JSON.

    python benchmarks/quant_kernel_tune.py [--hidden 4096 --intermediate 14336 --heads 32 --kv-heads 8]
        [--gemm-rows 256,2048] [--quick] [--write-config] [--out results/quant_kernel_tune]

What to do with it: the defaults in triton_gemv.FP8_CONFIG and triton_w4a16.GROUPED_* are the fastest on the
device the table was measured on; a different GPU wants its own run. --write-config writes this GPU's W4A16 table,
which triton_w4a16 reads on that GPU: serval/kernels/configs/w4a16,device=<GPU name>.json (and a copy under --out,
which is what comes back from a device call: copy it there and commit). Per projection its fastest GEMV and GEMM
(the GEMM at the first --gemm-rows), and as "default" (for other shapes) the configuration fastest over all four
projections together.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os

import torch


def projections(hidden: int, intermediate: int, heads: int, kv_heads: int) -> dict[str, tuple[int, int]]:
    """name -> (N, K) of each decode projection (merged qkv and gate/up as Serval runs them)."""
    head_dim = hidden // heads
    return {"qkv": ((heads + 2 * kv_heads) * head_dim, hidden), "o": (hidden, hidden),
            "gate_up": (2 * intermediate, hidden), "down": (hidden, intermediate)}


def time_ms(fn) -> float | None:
    import triton.testing
    try:
        return triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median")
    except Exception:  # noqa: BLE001 - a configuration past the device's limits is skipped
        return None


def tune(name: str, nbytes: int, run, configs: list, default) -> dict:
    timed = [(ms, config) for config in configs if (ms := time_ms(lambda c=config: run(c))) is not None]
    default_ms = time_ms(lambda: run(default))
    best_ms, best = min(timed, key=lambda t: t[0])
    row = {"projection": name, "default": list(default), "default_us": default_ms * 1e3,
           "default_gb_s": nbytes / default_ms / 1e6, "best": list(best), "best_us": best_ms * 1e3,
           "best_gb_s": nbytes / best_ms / 1e6, "all_us": {str(list(c)): ms * 1e3 for ms, c in timed}}
    print(f"  {name:<22} default {row['default_us']:8.1f} us {row['default_gb_s']:7.0f} GB/s   best "
          f"{row['best_us']:8.1f} us {row['best_gb_s']:7.0f} GB/s  {tuple(best)}", flush=True)
    return row


def device_table(rows: list[dict], shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, ...]]:
    """Per shape ("NxK") its fastest configuration, and "default": the one fastest over all the rows together
    (among those every row could run)."""
    table = {}
    for row in rows:
        n, k = shapes[row["projection"].split(" ")[0]]
        table[f"{n}x{k}"] = tuple(row["best"])
    common = set.intersection(*(set(row["all_us"]) for row in rows))
    if common:
        table["default"] = tuple(json.loads(min(common, key=lambda c: sum(row["all_us"][c] for row in rows))))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--gemm-rows", default="256,2048")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--write-config", action="store_true",
                        help="this GPU's W4A16 table under serval/kernels/configs/ (and --out)")
    parser.add_argument("--out", default="results/quant_kernel_tune")
    args = parser.parse_args()
    from serval.kernels import triton_fp8_block, triton_gemv, triton_w4a16
    from serval.layers.quant.w4a16 import pack_int4

    device = torch.device("cuda")
    results: dict = {"device": torch.cuda.get_device_name(device), "fp8_block_gemv": [], "w4a16_gemv": [],
                     "w4a16_gemm": []}
    shapes = projections(args.hidden, args.intermediate, args.heads, args.kv_heads)
    warps = (4, 8) if args.quick else (2, 4, 8)

    print(f"block-FP8 GEMV (128x128 blocks), {results['device']}")
    fp8_grid = list(itertools.product((1, 2, 4, 8), (512, 1024, 2048, 4096), warps))
    for name, (n, k) in shapes.items():
        weight, block_scale = triton_fp8_block.quantize_weight_blocks(
            torch.randn(n, k, device=device, dtype=torch.bfloat16), 128, 128)
        per_row = block_scale.repeat_interleave(128, dim=0)[:n].contiguous()
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        results["fp8_block_gemv"].append(tune(
            name, weight.numel() + per_row.numel() * 4,
            lambda c: triton_gemv.block_scaled_gemv(x, weight, per_row, 128, config=c), fp8_grid,
            triton_gemv.BLOCK_SCALED_CONFIG))

    print("W4A16 grouped GEMV (group 128)")
    gemv_grid = list(itertools.product((8, 16, 32), (128, 256, 512, 1024), warps))
    gemm_grid = list(itertools.product((32, 64, 128), (64, 128, 256), (32, 64, 128), (4, 8)))
    layouts = {}
    for name, (n, k) in shapes.items():
        q = torch.randint(0, 16, (k, n), device=device, dtype=torch.int32)
        layouts[name] = (pack_int4(q, 0).contiguous(), torch.rand(k // 128, n, device=device, dtype=torch.bfloat16),
                         torch.full((k // 128, n), 8, dtype=torch.uint8, device=device),
                         (torch.arange(k, device=device) // 128).int())
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        packed = layouts[name]
        results["w4a16_gemv"].append(tune(
            name, packed[0].numel() * 4 + packed[1].numel() * 3,
            lambda c: triton_w4a16.matmul(x, *packed, gemv_config=c, group_size=128), gemv_grid,
            triton_w4a16.GROUPED_GEMV_CONFIG))
    print("W4A16 grouped GEMM (group 128): TFLOP/s in place of GB/s")
    for rows in map(int, args.gemm_rows.split(",")):
        for name, (n, k) in shapes.items():
            x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
            packed = layouts[name]
            row = tune(f"{name} M={rows}", 2 * rows * n * k // 1000,
                       lambda c: triton_w4a16.matmul(x, *packed, gemm_config=c, group_size=128), gemm_grid,
                       triton_w4a16.GROUPED_GEMM_CONFIG)
            dense = torch.randn(k, n, device=device, dtype=torch.bfloat16)
            row["cublas_bf16_us"] = time_ms(lambda: x @ dense) * 1e3
            print(f"    cuBLAS bf16 on the same shape: {row['cublas_bf16_us']:.1f} us", flush=True)
            results["w4a16_gemm"].append(row)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quant_kernel_tune.json"), "w") as f:
        json.dump(results, f, indent=2)
    if args.write_config:
        first_rows = f"M={args.gemm_rows.split(',')[0]}"
        gemm_rows = [row for row in results["w4a16_gemm"] if row["projection"].endswith(first_rows)]
        text = triton_w4a16.config_table_json(device_table(results["w4a16_gemv"], shapes),
                                              device_table(gemm_rows, shapes), results["device"])
        name = triton_w4a16.config_file_name(results["device"])
        for directory in (triton_w4a16.CONFIG_DIR, args.out):
            with open(os.path.join(directory, name), "w") as f:
                f.write(text + "\n")
        print(f"\n{name} written under serval/kernels/configs/ and {args.out}:\n{text}")


if __name__ == "__main__":
    main()
