"""Time the quantized batch-1 kernels over a grid of configurations on this GPU, for the projections of one model
shape: the block-FP8 GEMV (serval.kernels.triton_gemv.block_scaled_gemv), the W4A16 split-K GEMV
(serval.kernels.triton_w4a16_gemv) and the W4A16 grouped GEMM (serval.kernels.triton_w4a16). Prints, per
projection, the default configuration's time and GB/s of weights read, and the fastest configuration's; writes JSON.

    python benchmarks/quant_kernel_tune.py [--hidden 4096 --intermediate 14336 --heads 32 --kv-heads 8]
        [--gemm-rows 256,2048] [--quick] [--skip-fp8] [--write-config] [--out results/quant_kernel_tune]
    python benchmarks/quant_kernel_tune.py --device cpu   # tiny shapes and grids in Triton's interpreter: a smoke run
    python benchmarks/quant_kernel_tune.py --count-instructions   # no GPU: the GEMV's SASS per weight for sm_90

The GEMVs are timed as a decode step runs them (as benchmarks/gemv_bench.py does): a CUDA graph of one product per
weight over enough copies of the weights (>= 256 MB) that they come from HBM, not the 50 MB L2, back to back, so a
kernel's start (and, with programmatic dependent launch, its overlap with the one before) counts as in decode. The
GEMM (hundreds of rows) is timed on its own (triton.testing.do_bench, which flushes L2 before each call).

What to do with it: the defaults in triton_gemv.BLOCK_SCALED_CONFIG and triton_w4a16.GROUPED_* are the fastest on the
device the table was measured on; a different GPU wants its own run. --write-config writes this GPU's W4A16 table,
which triton_w4a16 reads on that GPU: serval/kernels/configs/w4a16,device=<GPU name>.json (and a copy under --out,
which is what comes back from a device call: copy it there and commit). Per projection its fastest GEMV and GEMM
(the GEMM at the first --gemm-rows), and as "default" (for other shapes) the configuration fastest over all four
projections together. The GEMV's entries are triton_w4a16_gemv.SplitKConfig (BLOCK_N, BLOCK_K, SPLIT_K,
num_warps, num_stages; SPLIT_K 0: chosen from the SM count).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import torch

# Bytes of weights one timing cycles through: several times the H200's 50 MB L2.
ROTATION_BYTES = 256 * 2**20


def projections(hidden: int, intermediate: int, heads: int, kv_heads: int) -> dict[str, tuple[int, int]]:
    """name -> (N, K) of each decode projection (merged qkv and gate/up as Serval runs them)."""
    head_dim = hidden // heads
    return {"qkv": ((heads + 2 * kv_heads) * head_dim, hidden), "o": (hidden, hidden),
            "gate_up": (2 * intermediate, hidden), "down": (hidden, intermediate)}


def split_k_gemv_grid(quick: bool, cpu: bool = False) -> list[tuple[int, int, int, int, int]]:
    """The W4A16 GEMV's (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) to try. BLOCK_N is 128 or 256 columns a
    warp: a thread then holds whole columns (four or eight words wide) and sums its tile without the others. SPLIT_K
    32 and 64 give N = K = 4096 (Llama-3-8B's o projection) at least 4 programs a SM of an H200's 132 from 256 and
    from 128 columns a warp; 0 is the SM-count rule (triton_w4a16_gemv.split_k_slices)."""
    if cpu:
        return [(128, 64, 0, 1, 1), (128, 32, 2, 1, 1)]
    # Eight words a thread: BLOCK_K 128 would keep 128 words (and the next tile's) in registers, past 255.
    tiles = [(128, 32), (128, 64), (256, 64)] + ([] if quick else [(256, 32), (128, 128)])
    splits = (0, 8, 16, 32, 64) if quick else (0, 2, 4, 8, 16, 32, 64)
    grid = [(per_warp * warps, block_k, split, warps, 1)
            for (per_warp, block_k), split, warps in itertools.product(tiles, splits, (1, 2, 4))]
    if not quick:  # Triton's software pipelining, on the tiles most likely to win (each stage count compiles anew)
        grid += [(per_warp * warps, 64, split, warps, 2)
                 for per_warp, split, warps in itertools.product((128, 256), splits, (1, 2, 4))]
    return grid


def programs_per_sm(config: tuple[int, ...], n: int, k: int, num_sms: int) -> float:
    """How many programs a SM the split-K GEMV launches for an N x K weight at batch 1 under config."""
    from serval.kernels import triton_w4a16_gemv
    split = triton_w4a16_gemv.SplitKConfig(*config)
    block_k = min(split.block_k, 128)
    slices = triton_w4a16_gemv.split_k_slices(split, n, k, block_k, torch.device("cpu"), num_sms=num_sms)
    return -(-n // split.block_n) * slices.count / num_sms


def compiled_k_loop(kernel, signature: dict, constants: dict, aligned: list[str], num_warps: int,
                    num_stages: int, arch: int = 90) -> dict:
    """A Triton kernel compiled for sm_<arch>, no GPU needed (ptxas and cuobjdump ship with Triton), and its K loop's
    SASS: the loop with the most HFMA2/FFMA. signature: the pointer arguments' types (others i32 or constexpr);
    aligned: arguments specialized as divisible by 16, as a launch on Llama shapes specializes them. Returns its
    instruction count, registers and spills (cuobjdump -res-usage) and the count by opcode."""
    import collections
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    full_signature = {name: signature.get(name, "constexpr" if name in constants else "i32")
                      for name in kernel.arg_names}
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    compiled = triton.compile(ASTSource(fn=kernel, signature=full_signature, constexprs=constants, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", cubin.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin.name], capture_output=True,
                              text=True, check=True).stdout
    code = [(int(m.group(1), 16), m.group(2).strip())
            for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(m.group(1), 16), address) for address, text in code
             if (m := re.search(r"BRA(?:\.\w+)*\s.*?(0x[0-9a-f]+)", text)) and int(m.group(1), 16) < address]
    fma_count = lambda loop: sum("HFMA2" in t or "FFMA" in t for a, t in code if loop[0] <= a <= loop[1])  # noqa
    first, last = max(loops, key=fma_count)
    body = [text for address, text in code if first <= address <= last]
    opcodes = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0] for text in body)
    registers = re.search(r"REG:(\d+)", usage)
    spills = re.search(r"STACK:(\d+)", usage)
    return {"loop_instructions": len(body), "registers": int(registers.group(1)) if registers else None,
            "stack_bytes": int(spills.group(1)) if spills else None, "opcodes": dict(opcodes.most_common())}


def inner_loop_instructions(config: tuple[int, ...], rows: int = 1, arch: int = 90) -> dict:
    """The split-K GEMV (bfloat16 x, group 128) compiled for sm_<arch> (compiled_k_loop): its K loop's SASS
    instructions, per weight a thread handles, and by opcode."""
    from serval.kernels import triton_w4a16_gemv
    split = triton_w4a16_gemv.SplitKConfig(*config)
    pointers = {"x_ptr": "*bf16", "qweight_ptr": "*i32", "scales_ptr": "*bf16", "zeros_ptr": "*u8", "y_ptr": "*bf16",
                "partial_ptr": "*fp32", "counter_ptr": "*i32", "stage_ptr": "*fp16"}
    block_k = triton_w4a16_gemv.gemv_block_k(split, 128, rows)  # as a launch of that many rows caps it
    constants = dict(SPLIT=True, GROUP=128, ROWS=rows, BLOCK_N=split.block_n, BLOCK_K=block_k,
                     SLICE_CHUNK=16, HALF=True, X_CHUNK=1024, USE_ASM=True, USE_PDL=False)
    loop = compiled_k_loop(triton_w4a16_gemv._w4a16_split_k_gemv_kernel, pointers, constants,
                           [*pointers, "N", "K", "stride_x", "K_PER_SPLIT"], split.num_warps, split.num_stages, arch)
    weights = 2 * split.block_n * block_k / (32 * split.num_warps)  # the K loop takes two tiles an iteration
    return {"config": list(config), "rows": rows, "loop_instructions": loop["loop_instructions"],
            "weights_per_thread": weights, "per_weight": loop["loop_instructions"] / weights,
            "registers": loop["registers"], "stack_bytes": loop["stack_bytes"], "opcodes": loop["opcodes"]}


def count_instructions(configs: list[tuple[int, ...]], out: str) -> None:
    """--count-instructions: the table of inner_loop_instructions over configs (1 and 4 rows), and its JSON."""
    rows = []
    print(f"{'config':<26} {'rows':>4} {'loop':>6} {'per weight':>10} {'regs':>5} {'stack':>5}  top opcodes")
    for config in configs:
        for m in (1, 4):
            row = inner_loop_instructions(config, m)
            rows.append(row)
            top = ", ".join(f"{op} {count}" for op, count in list(row["opcodes"].items())[:6])
            print(f"{str(tuple(config)):<26} {m:>4} {row['loop_instructions']:>6} {row['per_weight']:>10.2f} "
                  f"{row['registers']:>5} {row['stack_bytes']:>5}  {top}", flush=True)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "w4a16_gemv_instructions.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print(f"\nwrote {os.path.join(out, 'w4a16_gemv_instructions.json')}")


def time_ms(fn) -> float | None:
    """Median ms of fn on its own (the GEMM), None when the configuration cannot run on this device."""
    import triton.testing
    try:
        return triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median")
    except Exception:  # noqa: BLE001 - a configuration past the device's limits is skipped
        return None


def time_graph_ms(fn, operands: list, repeats: int = 10) -> float | None:
    """ms per product: a CUDA graph of fn(operand) over every operand (distinct weight copies), replayed."""
    try:
        for operand in operands[:2]:  # Triton compiles and the split-K counters are allocated outside the capture
            fn(operand)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for operand in operands:
                fn(operand)
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / (repeats * len(operands))
    except Exception:  # noqa: BLE001 - a configuration past the device's limits (registers, shared memory)
        torch.cuda.synchronize()
        return None


def time_wall_ms(fn, operands: list) -> float | None:
    """ms of one call on the CPU (Triton's interpreter): the smoke run checks the script, not the speed."""
    fn(operands[0])
    start = time.perf_counter()
    fn(operands[0])
    return (time.perf_counter() - start) * 1e3


def copies_for(nbytes: int, cpu: bool) -> int:
    return 1 if cpu else max(2, -(-ROTATION_BYTES // nbytes))


def tune(name: str, nbytes: int, timer, configs: list, default) -> dict:
    """timer(config) -> ms or None, over the grid and the default; one row of the results."""
    timed = [(ms, config) for config in configs if (ms := timer(config)) is not None]
    default_ms = timer(default) or float("nan")  # NaN: the default cannot run here (the table must cover it)
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
    parser.add_argument("--quick", action="store_true", help="smaller grids (about a third of the compiles)")
    parser.add_argument("--skip-fp8", action="store_true", help="only the W4A16 kernels")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: tiny shapes and grids in Triton's interpreter, to check the script end to end")
    parser.add_argument("--write-config", action="store_true",
                        help="this GPU's W4A16 table under serval/kernels/configs/ (and --out)")
    parser.add_argument("--out", default="results/quant_kernel_tune")
    parser.add_argument("--count-instructions", action="store_true",
                        help="no timing: compile the W4A16 GEMV for sm_90 (no GPU needed) and count its K loop's "
                             "SASS instructions per weight, over the --quick grid's tiles")
    args = parser.parse_args()
    if args.count_instructions:
        tiles = sorted({(c[0], c[1], 0, c[3], c[4]) for c in split_k_gemv_grid(quick=True)})
        return count_instructions(tiles, args.out)
    cpu = args.device == "cpu"
    if cpu:
        if args.write_config:
            parser.error("--write-config measures a GPU: leave out --device cpu")
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels' module is imported, just below
        args.hidden, args.intermediate, args.heads, args.kv_heads, args.gemm_rows = 256, 512, 4, 2, "16"
    from serval.kernels import triton_fp8_block, triton_gemv, triton_w4a16
    from serval.layers.quant.w4a16 import pack_int4

    device = torch.device(args.device)
    device_name = "cpu (Triton interpreter)" if cpu else torch.cuda.get_device_name(device)
    results: dict = {"device": device_name, "fp8_block_gemv": [], "w4a16_gemv": [], "w4a16_gemm": []}
    shapes = projections(args.hidden, args.intermediate, args.heads, args.kv_heads)
    warps = (4, 8) if args.quick else (2, 4, 8)
    time_rotating = time_wall_ms if cpu else time_graph_ms

    print(f"block-FP8 GEMV (128x128 blocks), {results['device']}")
    fp8_grid = ([(4, 256, 4)] if cpu else
                list(itertools.product((1, 2, 4, 8), (512, 1024, 2048, 4096), warps)))
    for name, (n, k) in ({} if args.skip_fp8 else shapes).items():
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        weights = []
        for _ in range(copies_for(n * k, cpu)):
            weight, block_scale = triton_fp8_block.quantize_weight_blocks(
                torch.randn(n, k, device=device, dtype=torch.bfloat16), 128, 128)
            weights.append((weight, block_scale.repeat_interleave(128, dim=0)[:n].contiguous()))
        results["fp8_block_gemv"].append(tune(
            name, n * k + weights[0][1].numel() * 4,
            lambda c: time_rotating(lambda w: triton_gemv.block_scaled_gemv(x, w[0], w[1], 128, config=c), weights),
            fp8_grid, triton_gemv.BLOCK_SCALED_CONFIG))

    print("W4A16 split-K GEMV (group 128): (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages)")
    gemv_grid = split_k_gemv_grid(args.quick, cpu)
    gemm_grid = ([(16, 32, 64, 2)] if cpu else
                 list(itertools.product((64, 128), (64, 128), (64,), (4, 8))) if args.quick else
                 list(itertools.product((32, 64, 128), (64, 128, 256), (32, 64, 128), (4, 8))))
    layouts = {}
    for name, (n, k) in shapes.items():
        nbytes = k * n // 2 + (k // 128) * n * 3  # the words, and a scale (2 bytes) and zero (1) per group
        copies = []
        for _ in range(copies_for(nbytes, cpu)):
            q = torch.randint(0, 16, (k, n), device=device, dtype=torch.int32)
            copies.append((pack_int4(q, 0).contiguous(),
                           torch.rand(k // 128, n, device=device, dtype=torch.bfloat16) * 0.01,
                           torch.randint(0, 16, (k // 128, n), dtype=torch.uint8, device=device),
                           (torch.arange(k, device=device) // 128).int()))
        layouts[name] = copies[0]
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        results["w4a16_gemv"].append(tune(
            name, nbytes,
            lambda c: time_rotating(lambda w: triton_w4a16.matmul(x, *w, gemv_config=c, group_size=128), copies),
            gemv_grid, triton_w4a16.GROUPED_GEMV_CONFIG))
    print("W4A16 grouped GEMM (group 128): TFLOP/s in place of GB/s")
    for rows in map(int, args.gemm_rows.split(",")):
        for name, (n, k) in shapes.items():
            x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
            packed = layouts[name]

            def gemm_ms(c):
                run = lambda: triton_w4a16.matmul(x, *packed, gemm_config=c, group_size=128)  # noqa: E731
                return time_wall_ms(lambda _: run(), [None]) if cpu else time_ms(run)
            row = tune(f"{name} M={rows}", 2 * rows * n * k // 1000, gemm_ms, gemm_grid,
                       triton_w4a16.GROUPED_GEMM_CONFIG)
            dense = torch.randn(k, n, device=device, dtype=torch.bfloat16)
            cublas_ms = time_wall_ms(lambda _: x @ dense, [None]) if cpu else time_ms(lambda: x @ dense)
            row["cublas_bf16_us"] = cublas_ms * 1e3
            print(f"    {'torch' if cpu else 'cuBLAS'} bf16 on the same shape: {row['cublas_bf16_us']:.1f} us",
                  flush=True)
            results["w4a16_gemm"].append(row)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quant_kernel_tune.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwrote {os.path.join(args.out, 'quant_kernel_tune.json')}")
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
