"""Tune the fused-MoE Triton kernel (serval.kernels.triton_moe) for one GPU and one expert shape: one command
times every configuration of a grid at each batch size, writes the fastest per batch size as the JSON table the
kernel reads (serval/kernels/configs/E=..,H=..,I=..,device=<GPU name>.json), and prints it beside the default
configuration's time.

    python benchmarks/moe_tune.py --model benchmarks/configs/qwen3-30b-a3b      # E=128, H=2048, I=768, top-8
    python benchmarks/moe_tune.py --model benchmarks/configs/mixtral-8x7b       # E=8, H=4096, I=14336, top-2
    python benchmarks/moe_tune.py --experts 64 --hidden 2048 --intermediate 1408 --top-k 6 [--batch-sizes 1,64]
        [--quick] [--out results/moe_tune] [--dry-run (print, write no table)]

Each measurement is one whole fused_experts call (alignment, both GEMMs, combine) on bf16 weights with uniformly
random routing, the median of triton.testing.do_bench. Batch 1 is also reported as GB/s of expert weights read
(k experts' gate/up and down): the number to hold against the device's copy bandwidth.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os

import torch

from serval.kernels import triton_moe
from serval.layers.moe import softmax_top_k

logger = logging.getLogger("moe_tune")

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 2048, 4096, 8192)


def search_space(num_tokens: int, top_k: int, num_experts: int, quick: bool) -> list[triton_moe.MoeKernelConfig]:
    """The grid, less the M tiles far larger than the tokens an expert gets on average (padding only)."""
    rows_per_expert = num_tokens * top_k / num_experts
    block_ms = [m for m in (16, 32, 64, 128) if m <= max(16, 2 * rows_per_expert)]
    grid = itertools.product(block_ms, (32, 64, 128, 256), (64, 128, 256), (1, 16) if not quick else (1,),
                             (4, 8), (2, 3, 4, 5) if not quick else (3, 4))
    return [triton_moe.MoeKernelConfig(block_m=m, block_n=n, block_k=k, group_m=g, num_warps=w, num_stages=s)
            for m, n, k, g, w, s in grid]


def time_config(inputs: tuple, config: triton_moe.MoeKernelConfig) -> float | None:
    """Milliseconds per call, or None if the configuration does not compile or run (e.g. out of shared memory)."""
    import triton.testing
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
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
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
    table, rows = {}, []
    for num_tokens in [int(b) for b in args.batch_sizes.split(",")]:
        hidden_states = torch.randn(num_tokens, hidden, device=device, dtype=torch.bfloat16, generator=generator)
        logits = torch.randn(num_tokens, num_experts, device=device, generator=generator)
        inputs = (hidden_states, gate_up, down, softmax_top_k(logits, top_k, renormalize=True))
        default = triton_moe.default_config(num_tokens, num_experts)
        default_ms = time_config(inputs, default)
        timed = [(ms, config) for config in search_space(num_tokens, top_k, num_experts, args.quick)
                 if (ms := time_config(inputs, config)) is not None]
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
    name = triton_moe.config_file_name(num_experts, hidden, intermediate, device_name)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, name.replace(".json", ".timings.json")), "w") as f:
        json.dump({"device": device_name, "experts": num_experts, "hidden": hidden, "intermediate": intermediate,
                   "top_k": top_k, "rows": rows}, f, indent=1)
    text = triton_moe.config_table_json(table)
    if not args.dry_run:
        with open(os.path.join(triton_moe.CONFIG_DIR, name), "w") as f:
            f.write(text + "\n")
    print(f"\n{name}{' (dry run: not written)' if args.dry_run else ' written under serval/kernels/configs/'}")
    print(f"{'batch':>6}{'tuned us':>10}{'default us':>12}{'speedup':>9}  config")
    for row in rows:
        print(f"{row['batch']:>6}{row['best_ms'] * 1e3:>10.1f}{row['default_ms'] * 1e3:>12.1f}"
              f"{row['default_ms'] / row['best_ms']:>8.2f}x  {row['best']}")


if __name__ == "__main__":
    main()
