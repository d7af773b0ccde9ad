"""The Triton attention kernel's prefill (flat) launch on a GPU, over a grid of its configurations: the rows of a
program's matrix, the keys a loop step takes, num_warps, num_stages, and whether the key loop runs the tiles every
row sees without the causal masks (serval.kernels.triton_attention.PrefillConfig), on the steps a server runs:
whole prompts, a chunk after a cached prefix, and a prompt beside a batch of decodes. torch's
scaled_dot_product_attention (FlashAttention on Hopper) on the same prompts, contiguous, is the yardstick.
Prints a table (TFLOP/s of causal attention, and time) and writes JSON.

    python benchmarks/attention_tune.py [--out DIR] [--model benchmarks/configs/llama-3-8b] [--write-config]
    # two CPU cores, Triton's interpreter, tiny shapes (runs end to end; the times mean nothing):
    python benchmarks/attention_tune.py --tiny --write-config --out /tmp/attention_tiny

--write-config: the configuration with the least total time over the cases, checked against the torch
reference first, written to serval/kernels/configs/attention,device=<GPU name>.json under the model's key
(D=<head size>,G=<padded group>) and as the default when the table has none (and a copy under --out, which is
what comes back from a device call). Each timed call replays a CUDA graph of `--repeats` kernels, so launch gaps
don't count, as in the engine's graphs.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from dataclasses import dataclass

# --tiny runs the kernels in Triton's interpreter, which must be chosen before triton is imported.
if "--tiny" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serval.kernels import paged_attention as reference  # noqa: E402
from serval.kernels import triton_attention  # noqa: E402
from serval.kernels.triton_attention import PrefillConfig  # noqa: E402
from serval.kernels.triton_gemv import CONFIG_DIR  # noqa: E402
from serval.layers.attention import AttentionMetadata  # noqa: E402

BLOCK_SIZE = 16
GRID = {"rows": (64, 128), "tile_n": (32, 64, 128), "num_warps": (4, 8), "num_stages": (2, 3), "split_causal": (0, 1)}
TINY_GRID = {"rows": (16, 32), "tile_n": (16, 32), "num_warps": (4,), "num_stages": (1,), "split_causal": (0, 1)}


@dataclass
class Case:
    """One step: (cached tokens, new tokens) per request."""
    name: str
    spans: list[tuple[int, int]]

    def causal_flops(self, num_heads: int, head_dim: int) -> float:
        """QK^T and PV over the keys each query sees: 4 * D * sum over queries of (keys seen) per head."""
        total = 0
        for cached, new in self.spans:
            total += new * cached + new * (new + 1) // 2
        return 4.0 * head_dim * num_heads * total


def cases(tiny: bool) -> list[Case]:
    if tiny:
        return [Case("prompt 40", [(0, 40)]), Case("prompt 24 + 3 decodes", [(0, 24)] + [(30, 1)] * 3)]
    decodes = [(1024, 1)] * 32
    return [Case("prompt 512", [(0, 512)]), Case("prompt 1024", [(0, 1024)]), Case("prompt 2048", [(0, 2048)]),
            Case("prompt 4096", [(0, 4096)]), Case("chunk 512 after 1536", [(1536, 512)]),
            Case("prompt 1024 + 32 decodes", [(0, 1024)] + decodes),
            Case("4 prompts of 1024", [(0, 1024)] * 4)]


def build_step(case: Case, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
               device: str, generator: torch.Generator):
    """A paged cache holding each request's keys (its blocks shuffled), the step's query and metadata."""
    needed = [-(-(cached + new) // BLOCK_SIZE) for cached, new in case.spans]
    num_blocks = sum(needed) + 1
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables, used = [], 0
    for n in needed:
        tables.append(order[used:used + n])
        used += n
    width = max(needed)
    kv_cache = torch.randn(2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, generator=generator).to(device, dtype)
    query_start_loc = [0]
    for cached, new in case.spans:
        query_start_loc.append(query_start_loc[-1] + new)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)
    metadata = AttentionMetadata(slot_mapping=torch.zeros(query_start_loc[-1], dtype=torch.int64, device=device),
                                 query_start_loc=query_start_loc,
                                 seq_lens=[cached + new for cached, new in case.spans],
                                 block_tables=block_tables, block_size=BLOCK_SIZE)
    query = torch.randn(query_start_loc[-1], num_heads, head_dim, generator=generator).to(device, dtype)
    return query, kv_cache, metadata


def run_kernel(config: PrefillConfig, query, kv_cache, metadata, scale, out):
    return triton_attention.paged_attention(query, kv_cache, metadata, scale, out=out, prefill=config)


def time_call(call, repeats: int, device: str) -> float:
    """Seconds a call takes: on CUDA one graph of `repeats` calls (after a warm-up that compiles), median of 5."""
    call()
    if device != "cuda":
        return 0.0
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            call()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / repeats)
    return sorted(times)[2]


def sdpa_time(case: Case, num_heads: int, num_kv_heads: int, head_dim: int, dtype, device: str,
              repeats: int) -> float | None:
    """torch's SDPA over the same prompts (contiguous, one call per request, causal); None for a batch with chunks
    after a cached prefix or decodes, which it does not run in one call."""
    if device != "cuda" or any(cached for cached, _ in case.spans):
        return None
    group = num_heads // num_kv_heads
    tensors = []
    for _, new in case.spans:
        q = torch.randn(1, num_heads, new, head_dim, device=device, dtype=dtype)
        k = torch.randn(1, num_kv_heads, new, head_dim, device=device, dtype=dtype).repeat_interleave(group, 1)
        tensors.append((q, k, torch.randn_like(k)))

    def call():
        for q, k, v in tensors:
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return time_call(call, repeats, device)


def model_shape(path: str) -> tuple[int, int, int]:
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    num_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // num_heads
    return num_heads, config.get("num_key_value_heads", num_heads), head_dim


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="benchmarks/configs/llama-3-8b", help="a config.json's directory")
    parser.add_argument("--out", default="results/attention_tune")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=20, help="kernels per timed graph")
    parser.add_argument("--write-config", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="CPU: the interpreter, 2 x 4 heads of 16, a small grid")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = getattr(torch, args.dtype) if device == "cuda" else torch.float32
    num_heads, num_kv_heads, head_dim = (4, 2, 16) if args.tiny else model_shape(args.model)
    group_pad = 1 << (num_heads // num_kv_heads - 1).bit_length()
    grid = TINY_GRID if args.tiny else GRID
    configs = [PrefillConfig(*values) for values in itertools.product(*grid.values())]
    configs = [c for c in configs if c.rows >= max(16, group_pad)]
    generator = torch.Generator().manual_seed(0)
    steps = [(case, *build_step(case, num_heads, num_kv_heads, head_dim, dtype, device, generator))
             for case in cases(args.tiny)]
    scale = head_dim ** -0.5
    # The first case against the torch reference, for every configuration: a wrong launch is never timed.
    case, query, kv_cache, metadata = steps[0]
    expected = reference.paged_attention(query.float(), kv_cache.float(), metadata, scale)
    times: dict[PrefillConfig, list[float]] = {}
    failures: dict[str, str] = {}
    for config in configs:
        try:
            out = run_kernel(config, query, kv_cache, metadata, scale, torch.empty_like(query))
            torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)
            times[config] = [time_call(lambda q=q, kv=kv, m=m: run_kernel(config, q, kv, m, scale, torch.empty_like(q)),
                                       args.repeats, device) for _, q, kv, m in steps]
        except Exception as error:  # out of shared memory, a compile failure, or a wrong result: not a candidate
            failures[json.dumps(config.as_list())] = f"{type(error).__name__}: {str(error)[:200]}"
    if not times:
        raise SystemExit(f"no configuration ran: {failures}")
    default = triton_attention.PREFILL_CONFIG
    best = min(times, key=lambda c: sum(times[c]))
    sdpa = [sdpa_time(case, num_heads, num_kv_heads, head_dim, dtype, device, args.repeats) for case, *_ in steps]
    rows = []
    print(f"Prefill attention on {device_name(device)}: {num_heads} heads, {num_kv_heads} KV heads, head size "
          f"{head_dim}, {args.dtype if device == 'cuda' else 'float32'}, paged blocks of {BLOCK_SIZE}")
    print("case | TFLOP | built-in us | TFLOP/s | best us | TFLOP/s | SDPA us | TFLOP/s | best / built-in")
    for index, (case, *_rest) in enumerate(steps):
        flops = case.causal_flops(num_heads, head_dim)
        built_in = times.get(default, [None] * len(steps))[index]
        ours, theirs = times[best][index], sdpa[index]

        def rate(seconds):
            return flops / seconds / 1e12 if seconds else None

        def cell(value, fmt):
            return "-" if value is None else format(value, fmt)
        rows.append({"case": case.name, "spans": case.spans, "tflop": flops / 1e12, "built_in_s": built_in,
                     "best_s": ours, "sdpa_s": theirs})
        print(f"{case.name} | {flops / 1e12:.3f} | {cell(built_in and built_in * 1e6, '.1f')} | "
              f"{cell(rate(built_in), '.0f')} | {cell(ours * 1e6, '.1f')} | {cell(rate(ours), '.0f')} | "
              f"{cell(theirs and theirs * 1e6, '.1f')} | {cell(rate(theirs), '.0f')} | "
              f"{cell(built_in and ours and built_in / ours, '.2f')}x")
    print(f"best {best} (built-in {default}); {len(times)} configurations ran, {len(failures)} did not")
    os.makedirs(args.out, exist_ok=True)
    key = triton_attention.prefill_shape_key(head_dim, group_pad)
    result = {"device": device_name(device), "shape": {"num_heads": num_heads, "num_kv_heads": num_kv_heads,
                                                       "head_dim": head_dim, "key": key},
              "best": best.as_list(), "built_in": default.as_list(), "cases": rows,
              "all_s": {json.dumps(c.as_list()): t for c, t in times.items()}, "failed": failures}
    with open(os.path.join(args.out, "attention_tune.json"), "w") as f:
        json.dump(result, f, indent=1)
    if args.write_config:
        name = triton_attention.attention_config_file_name(device_name(device) if device == "cuda" else "cpu")
        path = os.path.join(CONFIG_DIR, name) if device == "cuda" else os.path.join(args.out, name)
        table = {"device": device_name(device), "prefill": {}}
        if os.path.isfile(path):
            with open(path) as f:
                table = json.load(f)
        table.setdefault("prefill", {})[key] = best.as_list()
        table["prefill"].setdefault("default", best.as_list())
        text = json.dumps(table, indent=1)
        for target in {path, os.path.join(args.out, name)}:
            with open(target, "w") as f:
                f.write(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
