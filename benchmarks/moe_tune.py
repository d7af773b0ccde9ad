"""Tune the fused-MoE Triton kernel (serval.kernels.triton_moe) for one GPU and one expert shape: one command
times every configuration of a grid at each batch size, writes the fastest per batch size as the JSON table the
kernel reads (serval/kernels/configs/E=..,H=..,I=..,device=<GPU name>.json), and prints it beside the default
configuration's time.

    python benchmarks/moe_tune.py --model benchmarks/configs/qwen3-30b-a3b      # E=128, H=2048, I=768, top-8
    python benchmarks/moe_tune.py --model benchmarks/configs/mixtral-8x7b       # E=8, H=4096, I=14336, top-2
    python benchmarks/moe_tune.py --experts 64 --hidden 2048 --intermediate 1408 --top-k 6 [--batch-sizes 1,64]
        [--quick] [--out results/moe_tune] [--dry-run (print, write no table)]

The table keeps batch sizes an earlier run tuned and is rewritten after each batch size, so a sweep can be split
over device calls (`--batch-sizes 1,2,4,8,16,24,32,48,64` in one, the rest in the next) and a stopped run keeps what
it reached. A batch size between two tuned ones takes the nearer one's configuration.

Each measurement is one whole fused_experts call (alignment, both GEMMs, combine) on bf16 weights with uniformly
random routing, the median of triton.testing.do_bench. Batch 1 is also reported as GB/s of expert weights read
(k experts' gate/up and down): the number to hold against the device's copy bandwidth.

--gemv tunes the small-batch path instead (serval.kernels.triton_moe_gemv):
each of its two kernels' [BLOCK_N, BLOCK_K, num_warps] at batch 1, then both paths at growing batch sizes for the
largest T * k at which the GEMV path still wins (max_rows), merged into configs/moe_gemv,device=<GPU name>.json:

    python benchmarks/moe_tune.py --gemv --model benchmarks/configs/qwen3-30b-a3b [--fp8] [--quick]
    python benchmarks/moe_tune.py --gemv --tiny --device cpu --out /tmp/moe_gemv_tune    # interpreter, tiny grid
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os

import time

import torch

from serval.layers.moe import softmax_top_k

logger = logging.getLogger("moe_tune")
TINY_SHAPE = (16, 64, 32, 8)  # experts, hidden, intermediate, top-k: --gemv --tiny, in the interpreter

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 2048, 4096, 8192)


def search_space(num_tokens: int, top_k: int, num_experts: int, quick: bool) -> list:
    """The grid, less the M tiles far larger than the tokens an expert gets on average (padding only)."""
    from serval.kernels import triton_moe
    rows_per_expert = num_tokens * top_k / num_experts
    block_ms = [m for m in (16, 32, 64, 128) if m <= max(16, 2 * rows_per_expert)]
    grid = itertools.product(block_ms, (32, 64, 128, 256), (64, 128, 256), (1, 16) if not quick else (1,),
                             (4, 8), (2, 3, 4, 5) if not quick else (3, 4))
    return [triton_moe.MoeKernelConfig(block_m=m, block_n=n, block_k=k, group_m=g, num_warps=w, num_stages=s)
            for m, n, k, g, w, s in grid]


def time_config(inputs: tuple, config) -> float | None:
    """Milliseconds per call, or None if the configuration does not compile or run (e.g. out of shared memory)."""
    import triton.testing

    from serval.kernels import triton_moe
    try:
        return triton.testing.do_bench(lambda: triton_moe.fused_experts(*inputs, config=config), warmup=10, rep=40,
                                       return_mode="median")
    except Exception as error:  # noqa: BLE001 - a config past the device's limits is skipped, not fatal
        logger.debug("config failed", extra={"config": config, "error": str(error)})
        return None


def expert_shape(args) -> tuple[int, int, int, int]:
    if args.model:
        with open(os.path.join(args.model, "config.json")) as f:
            config = json.load(f)
        experts = config.get("num_local_experts") or config["num_experts"]
        intermediate = config.get("moe_intermediate_size") or config["intermediate_size"]
        return experts, config["hidden_size"], intermediate, config["num_experts_per_tok"]
    return args.experts, args.hidden, args.intermediate, args.top_k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a directory with a MoE config.json (benchmarks/configs/...)")
    parser.add_argument("--experts", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    parser.add_argument("--quick", action="store_true", help="a smaller grid (group_m 1, 2 pipeline depths)")
    parser.add_argument("--dry-run", action="store_true", help="print the table, write nothing under serval/")
    parser.add_argument("--out", default="results/moe_tune", help="where the run's JSON (all timings) goes")
    parser.add_argument("--gemv", action="store_true",
                        help="tune the small-batch GEMV path instead (serval.kernels.triton_moe_gemv): its two "
                             "kernels' blocks at batch 1 and where it stops beating the grouped kernel (max_rows)")
    parser.add_argument("--fp8", action="store_true", help="with --gemv: tune the float8-expert section too")
    parser.add_argument("--tiny", action="store_true", help="with --gemv: a tiny shape and grid (the interpreter)")
    parser.add_argument("--device", default="cuda", help="with --gemv --tiny: cpu runs Triton's interpreter")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.gemv:
        gemv_main(args, parser)
        return
    from serval.kernels import triton_moe
    num_experts, hidden, intermediate, top_k = expert_shape(args)
    if None in (num_experts, hidden, intermediate, top_k):
        parser.error("give --model, or all of --experts --hidden --intermediate --top-k")
    device = torch.device("cuda")
    device_name = torch.cuda.get_device_name(device)
    generator = torch.Generator(device=device).manual_seed(0)
    gate_up = torch.randn(num_experts, 2 * intermediate, hidden, device=device, dtype=torch.bfloat16,
                          generator=generator) * 0.02
    down = torch.randn(num_experts, hidden, intermediate, device=device, dtype=torch.bfloat16,
                       generator=generator) * 0.02
    name = triton_moe.config_file_name(num_experts, hidden, intermediate, device_name)
    table_path = os.path.join(triton_moe.CONFIG_DIR, name)
    # Batch sizes tuned by an earlier run (or an earlier device call, when one call can't hold the whole sweep) are
    # kept unless this run tunes them again; the table is rewritten after each batch size, so a run stopped by its
    # time limit keeps what it measured.
    table = dict(triton_moe.read_table(table_path) or {}) if not args.dry_run else {}
    rows = []
    os.makedirs(args.out, exist_ok=True)
    for num_tokens in [int(b) for b in args.batch_sizes.split(",")]:
        hidden_states = torch.randn(num_tokens, hidden, device=device, dtype=torch.bfloat16, generator=generator)
        logits = torch.randn(num_tokens, num_experts, device=device, generator=generator)
        inputs = (hidden_states, gate_up, down, softmax_top_k(logits, top_k, renormalize=True))
        default = triton_moe.default_config(num_tokens, num_experts)
        default_ms = time_config(inputs, default)
        timed = [(ms, config) for config in search_space(num_tokens, top_k, num_experts, args.quick)
                 if (ms := time_config(inputs, config)) is not None]
        if default_ms is not None:  # the grid may lack the default (--quick has no group_m 8): never worse than it
            timed.append((default_ms, default))
        best_ms, best = min(timed, key=lambda pair: pair[0])
        table[num_tokens] = best
        experts_read = len(torch.unique(inputs[3].expert_ids))
        weight_bytes = experts_read * 3 * hidden * intermediate * 2
        rows.append({"batch": num_tokens, "best_ms": best_ms, "default_ms": default_ms, "best": best.__dict__,
                     "experts_read": experts_read, "weight_gb_s": weight_bytes / best_ms / 1e6,
                     "configs_timed": len(timed)})
        print(f"batch {num_tokens:>5}: {best_ms * 1e3:8.1f} us tuned, {default_ms * 1e3:8.1f} us default "
              f"({default_ms / best_ms:4.2f}x); {rows[-1]['weight_gb_s']:7.0f} GB/s of {experts_read} experts' "
              f"weights; {best}", flush=True)
        with open(os.path.join(args.out, name.replace(".json", ".timings.json")), "w") as f:
            json.dump({"device": device_name, "experts": num_experts, "hidden": hidden,
                       "intermediate": intermediate, "top_k": top_k, "rows": rows}, f, indent=1)
        if not args.dry_run:
            with open(table_path, "w") as f:
                f.write(triton_moe.config_table_json(table) + "\n")
    print(f"\n{name}{' (dry run: not written)' if args.dry_run else ' written under serval/kernels/configs/'}")
    print(f"{'batch':>6}{'tuned us':>10}{'default us':>12}{'speedup':>9}  config")
    for row in rows:
        print(f"{row['batch']:>6}{row['best_ms'] * 1e3:>10.1f}{row['default_ms'] * 1e3:>12.1f}"
              f"{row['default_ms'] / row['best_ms']:>8.2f}x  {row['best']}")


def gemv_grid(kernel: str, reduced_size: int, float8: bool, quick: bool, tiny: bool) -> list[tuple[int, int, int]]:
    """[BLOCK_N, BLOCK_K, num_warps] to try for one of the GEMV path's kernels: BLOCK_N counts gate and up rows
    (gate_up) or the k experts' rows together (down); BLOCK_K is clipped to the reduced width, so some coincide."""
    if tiny:
        block_ns, block_ks, warps = ((1, 2), (32, 64), (4,)) if kernel == "gate_up" else ((8, 16), (16, 32), (4,))
    elif kernel == "gate_up":
        block_ns, block_ks, warps = ((1, 2, 4), (512, 1024, 2048), (4, 8)) if quick else \
            ((1, 2, 4, 8), (256, 512, 1024, 2048), (2, 4, 8))
    else:
        block_ns, block_ks, warps = ((8, 16, 32), (256, 512), (4, 8)) if quick else \
            ((8, 16, 32, 64), (128, 256, 512, 1024), (2, 4, 8))
    scale = 2 if float8 else 1  # one byte a weight: twice the K for the same bytes a step
    grid = {(n, min(k * scale, 1 << (reduced_size - 1).bit_length()), w)
            for n, k, w in itertools.product(block_ns, block_ks, warps)}
    # Tiles past 32K elements a step spill registers on any GPU: not worth compiling.
    return sorted(c for c in grid if c[0] * c[1] * (2 if kernel == "gate_up" else 1) <= 32768)


def time_ms(fn, device: torch.device) -> float | None:
    """Median milliseconds per call (triton's do_bench on a GPU, the wall clock in the interpreter), or None if
    the configuration does not compile or run."""
    try:
        if device.type == "cuda":
            import triton.testing
            return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
        fn()
        times = []
        for _ in range(3):
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
        return sorted(times)[1]
    except Exception as error:  # noqa: BLE001 - a config past the device's limits is skipped, not fatal
        logger.debug("config failed", extra={"error": str(error)})
        return None


def tune_kernel(name: str, run, grid: list, device: torch.device, bytes_read: int) -> dict:
    """The fastest of grid for run(config), with every timing."""
    timed = [(ms, config) for config in grid if (ms := time_ms(lambda: run(config), device)) is not None]
    best_ms, best = min(timed)
    print(f"  {name:>14}: {best_ms * 1e3:8.1f} us, {bytes_read / best_ms / 1e6:7.0f} GB/s, {list(best)} "
          f"({len(timed)} of {len(grid)} configs ran)", flush=True)
    return {"best": list(best), "best_ms": best_ms, "gb_per_s": bytes_read / best_ms / 1e6,
            "timings": [[list(config), ms] for ms, config in timed]}


def gemv_main(args, parser) -> None:
    """--gemv: tune serval.kernels.triton_moe_gemv for one expert shape and merge it into the device's table."""
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel modules load
    from serval.kernels import triton_moe_gemv
    from serval.layers.moe import FusedMoE
    num_experts, hidden, intermediate, top_k = TINY_SHAPE if args.tiny else expert_shape(args)
    if None in (num_experts, hidden, intermediate, top_k):
        parser.error("give --model, --tiny, or all of --experts --hidden --intermediate --top-k")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    generator = torch.Generator(device=device).manual_seed(0)
    gate_up = (torch.randn(num_experts, 2 * intermediate, hidden, device=device, generator=generator) * 0.02).to(dtype)
    down = (torch.randn(num_experts, hidden, intermediate, device=device, generator=generator) * 0.02).to(dtype)
    formats = {"half": ((gate_up, down), {}, dtype.itemsize)}
    if args.fp8:
        with torch.device("meta"):
            quantized = FusedMoE(num_experts, hidden, intermediate)
        quantized.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
        quantized.down_proj = torch.nn.Parameter(down, requires_grad=False)
        quantized.quantize_fp8_()
        formats["float8"] = ((quantized.gate_up_proj, quantized.down_proj),
                             {"scales": (quantized.gate_up_proj_scale, quantized.down_proj_scale)}, 1)

    def inputs(num_tokens: int):
        x = torch.randn(num_tokens, hidden, device=device, dtype=dtype, generator=generator)
        logits = torch.randn(num_tokens, num_experts, device=device, generator=generator)
        return x, softmax_top_k(logits, top_k, renormalize=True)

    x, routing = inputs(1)
    chosen = len(torch.unique(routing.expert_ids))
    print(f"GEMV path, E={num_experts} H={hidden} I={intermediate} top-{top_k}, {device_name}, batch 1 "
          f"({chosen} experts read)")
    tuned, report = {}, {"device": device_name, "experts": num_experts, "hidden": hidden,
                         "intermediate": intermediate, "top_k": top_k, "kernels": {}}
    for fmt, ((w_gate_up, w_down), extra, itemsize) in formats.items():
        gate_up_scale, down_scale = extra.get("scales", (None, None))
        act = triton_moe_gemv.gate_up_gemv(x, w_gate_up, routing.expert_ids, gate_up_scale=gate_up_scale)
        gate_up_run = tune_kernel(
            f"{fmt} gate_up", lambda c: triton_moe_gemv.gate_up_gemv(x, w_gate_up, routing.expert_ids,
                                                                      gate_up_scale=gate_up_scale, config=c),
            gemv_grid("gate_up", hidden, fmt == "float8", args.quick, args.tiny), device,
            chosen * 2 * intermediate * hidden * itemsize)
        down_run = tune_kernel(
            f"{fmt} down", lambda c: triton_moe_gemv.down_gemv(act, w_down, routing.expert_ids, routing.weights,
                                                                down_scale=down_scale, config=c),
            gemv_grid("down", intermediate, fmt == "float8", args.quick, args.tiny), device,
            chosen * hidden * intermediate * itemsize)
        tuned[fmt] = {"gate_up": tuple(gate_up_run["best"]), "down": tuple(down_run["best"])}
        report["kernels"][fmt] = {"gate_up": gate_up_run, "down": down_run}
    max_rows, crossover = gemv_crossover(inputs, gate_up, down, tuned["half"], top_k, device, args.tiny)
    report["crossover"], report["max_rows"] = crossover, max_rows
    write_gemv_table(args, triton_moe_gemv, device_name, (intermediate, hidden), tuned, max_rows, report)


def gemv_crossover(inputs, gate_up, down, configs: dict, top_k: int, device: torch.device, tiny: bool):
    """Both paths at growing batch sizes: the largest T * k up to which the GEMV path (tuned configs) beats the
    grouped kernel (its own table or default) at every batch size tried."""
    from serval.kernels import triton_moe, triton_moe_gemv
    rows, max_rows, winning = [], 0, True
    for num_tokens in (1, 2, 4) if tiny else (1, 2, 4, 8, 16, 32, 64):
        x, routing = inputs(num_tokens)
        gemv_ms = time_ms(lambda: triton_moe_gemv.fused_experts_gemv(
            x, gate_up, down, routing, gate_up_config=configs["gate_up"], down_config=configs["down"]), device)
        grouped_ms = time_ms(lambda: triton_moe.fused_experts_grouped(x, gate_up, down, routing), device)
        winning = winning and gemv_ms < grouped_ms
        if winning:
            max_rows = num_tokens * top_k
        rows.append({"batch": num_tokens, "slots": num_tokens * top_k, "gemv_ms": gemv_ms, "grouped_ms": grouped_ms})
        print(f"  batch {num_tokens:>3} ({num_tokens * top_k:>4} slots): GEMV {gemv_ms * 1e3:8.1f} us, grouped "
              f"{grouped_ms * 1e3:8.1f} us ({grouped_ms / gemv_ms:4.2f}x)", flush=True)
    return max_rows, rows


def write_gemv_table(args, triton_moe_gemv, device_name: str, shape: tuple[int, int], tuned: dict, max_rows: int,
                     report: dict) -> None:
    """Merge this shape's entries into the device's table (configs/, or only --out on a CPU or with --dry-run)."""
    intermediate, hidden = shape
    name = triton_moe_gemv.config_file_name(device_name)
    path = os.path.join(triton_moe_gemv.CONFIG_DIR, name)
    table = {}
    if os.path.isfile(path) and device_name != "cpu":
        with open(path) as f:
            table = json.load(f)
    sections = {fmt: {kernel: dict((table.get(fmt) or {}).get(kernel) or {}) for kernel in ("gate_up", "down")}
                for fmt in ("half", "float8")}
    for fmt, configs in tuned.items():
        sections[fmt]["gate_up"][triton_moe_gemv.shape_key(intermediate, hidden)] = configs["gate_up"]
        sections[fmt]["down"][triton_moe_gemv.shape_key(hidden, intermediate)] = configs["down"]
    rows = dict(table.get("max_rows") or {}, **{triton_moe_gemv.shape_key(intermediate, hidden): max_rows})
    text = triton_moe_gemv.config_table_json(device_name, rows, sections["half"], sections["float8"])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, name.replace(".json", ".timings.json")), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, name), "w") as f:
        f.write(text + "\n")
    written = not args.dry_run and device_name != "cpu"
    if written:
        with open(path, "w") as f:
            f.write(text + "\n")
    print(f"\n{name}: max_rows {max_rows} for I x H = {intermediate}x{hidden}; "
          f"{'written under serval/kernels/configs/ and ' if written else ''}under {args.out}")
    print(text)


if __name__ == "__main__":
    main()
