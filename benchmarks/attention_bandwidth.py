"""The attention of a serving step in its steady state: a full batch of decodes (the 1000-request workload keeps 256
running at ~500-1,300 tokens of context) alone and beside a prompt chunk, with a bfloat16 and a float8 KV cache.
Decode attention reads every running request's K/V once a step, so its yardstick is bandwidth: GB/s of K/V read
against a streaming read measured in the same run. Each case also runs its flat launch over a small grid of
configurations (serval.kernels.triton_attention.PrefillConfig), because a step carrying a prompt runs its decode
rows through the flat launch, one program a request and KV head with no split of the keys.

    python benchmarks/attention_bandwidth.py [--out DIR] [--model benchmarks/configs/llama-3-8b] [--write-config]
    python benchmarks/attention_bandwidth.py --tiny   # CPU, Triton's interpreter: runs end to end, times mean nothing

--write-config: the decode launch with the least total time over the decode-only cases of both caches (each checked
against the torch reference first) goes into serval/kernels/configs/attention,device=<GPU name>.json's "decode"
section under the model's key (D=<head size>,G=<padded group>), and a copy under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if "--tiny" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.attention_tune import Case, build_step, model_shape, time_call  # noqa: E402
from serval.kernels import paged_attention as reference  # noqa: E402
from serval.kernels import triton_attention  # noqa: E402
from serval.kernels.triton_attention import PrefillConfig  # noqa: E402
from serval.kernels.triton_gemv import CONFIG_DIR  # noqa: E402

FLAT_GRID = [PrefillConfig(rows, tile_n, warps, stages, 0)
             for rows in (16, 64) for tile_n in (64, 128) for warps in (4, 8) for stages in (2, 3)]
# A decode launch's rows come from the batch (16 packed query heads), so only the rest of PrefillConfig applies.
DECODE_GRID = [PrefillConfig(16, tile_n, warps, stages, 0)
               for tile_n in (32, 64, 128) for warps in (2, 4, 8) for stages in (2, 3, 4)]


def cases(tiny: bool) -> list[Case]:
    if tiny:
        return [Case("4 decodes @ 40", [(40, 1)] * 4), Case("4 decodes @ 40 + prompt 24", [(40, 1)] * 4 + [(0, 24)])]
    decodes = [(800, 1)] * 256
    return [Case("256 decodes @ 800", decodes),
            Case("256 decodes @ 800, flat launch", decodes[:-1] + [(799, 2)]),
            Case("256 decodes @ 800 + prompt 1024", decodes + [(0, 1024)]),
            Case("256 decodes @ 800 + chunk 512 after 1024", decodes + [(1024, 512)]),
            Case("64 decodes @ 1500", [(1500, 1)] * 64),
            Case("64 decodes @ 1500 + prompt 2048", [(1500, 1)] * 64 + [(0, 2048)])]


def kv_bytes(case: Case, num_kv_heads: int, head_dim: int, element_size: int) -> int:
    return sum(cached + new for cached, new in case.spans) * 2 * num_kv_heads * head_dim * element_size


def best_decode_config(rows: list[dict]) -> list[int] | None:
    """The decode configuration with the least total time over the decode-only cases (every one of which it ran)."""
    totals: dict[str, list[float]] = {}
    decode_rows = [row for row in rows if row["decode"]]
    for row in decode_rows:
        for config, seconds in row["configs_s"].items():
            if isinstance(seconds, float):
                totals.setdefault(config, []).append(seconds)
    complete = {config: sum(times) for config, times in totals.items() if len(times) == len(decode_rows)}
    return json.loads(min(complete, key=complete.get)) if complete else None


def write_decode_config(path: str, device_name: str, key: str, config: list[int]) -> dict:
    """Adds the decode entry to the device's attention table (its prefill entries kept)."""
    table = {"device": device_name}
    if os.path.isfile(path):
        with open(path) as f:
            table = json.load(f)
    table.setdefault("decode", {})[key] = config
    with open(path, "w") as f:
        f.write(json.dumps(table, indent=1) + "\n")
    return table


def stream_read_gbps(device: str) -> float | None:
    """A sum over 4 GiB (the yardstick workload_bounds.py uses)."""
    if device != "cuda":
        return None
    source = torch.ones(1 << 29, dtype=torch.int64, device=device)
    seconds = time_call(source.sum, 5, device)
    return source.numel() * source.element_size() / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="benchmarks/configs/llama-3-8b")
    parser.add_argument("--out", default="results/attention_bandwidth")
    parser.add_argument("--repeats", type=int, default=10, help="kernels per timed graph")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--write-config", action="store_true")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    num_heads, num_kv_heads, head_dim = (4, 2, 16) if args.tiny else model_shape(args.model)
    scale = head_dim ** -0.5
    grid = FLAT_GRID[:2] if args.tiny else FLAT_GRID
    stream = stream_read_gbps(device)
    rows = []
    best_decode: dict[str, PrefillConfig] = {}
    print(f"Attention of serving steps on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}: "
          f"{num_heads} heads, {num_kv_heads} KV heads, head size {head_dim}; streaming read "
          f"{stream and round(stream)} GB/s")
    print("case | KV | MB read | engine us | GB/s | of stream | bf16 products us | split decodes us | split, best "
          "decode config us | best config | us | GB/s")
    for kv_dtype in ("bfloat16", "float8_e4m3fn"):
        generator = torch.Generator().manual_seed(0)
        for case in cases(args.tiny):
            query, kv_cache, metadata = build_step(case, num_heads, num_kv_heads, head_dim, dtype, device, generator)
            kv_cache = kv_cache.to(getattr(torch, kv_dtype)) if device == "cuda" else kv_cache
            expected = reference.paged_attention(query.float(), kv_cache.float(), metadata, scale)
            out = torch.empty_like(query)

            def engine_call():
                return triton_attention.paged_attention(query, kv_cache, metadata, scale, out=out)
            torch.testing.assert_close(engine_call().float(), expected, atol=3e-2, rtol=3e-2)
            engine_s = time_call(engine_call, args.repeats, device)
            flat = {}
            if kv_cache.dtype != query.dtype:  # the float8 cache's products in the query's own type, for the record
                def bf16_call():
                    return triton_attention.paged_attention(query, kv_cache, metadata, scale, out=out,
                                                            half_products=False)
                flat["bf16 products"] = time_call(bf16_call, args.repeats, device)
            decode = metadata.max_query_len == 1
            if not decode:  # the decode rows in their own launch, with the built-in and the best decode config
                for name, config in (("split decodes", None), ("split decodes, best decode config",
                                                               best_decode.get(kv_dtype))):
                    def split_call(config=config):
                        return triton_attention.paged_attention(query, kv_cache, metadata, scale, out=out,
                                                                split_decodes=True, decode=config)
                    torch.testing.assert_close(split_call().float(), expected, atol=3e-2, rtol=3e-2)
                    flat[name] = time_call(split_call, args.repeats, device)
            for config in (grid if not decode else DECODE_GRID[:2] if args.tiny else DECODE_GRID):
                def flat_call(config=config):
                    return triton_attention.paged_attention(query, kv_cache, metadata, scale, out=out,
                                                            **{"decode" if decode else "prefill": config})
                try:
                    torch.testing.assert_close(flat_call().float(), expected, atol=3e-2, rtol=3e-2)
                    flat[json.dumps(config.as_list())] = time_call(flat_call, args.repeats, device)
                except Exception as error:  # out of shared memory or a compile failure: not a candidate
                    flat[json.dumps(config.as_list())] = f"{type(error).__name__}: {str(error)[:120]}"
            special = ("bf16 products", "split decodes", "split decodes, best decode config")
            timed = {k: v for k, v in flat.items() if isinstance(v, float) and k not in special}
            best = min(timed, key=timed.get) if timed else None
            if decode and best and kv_dtype not in best_decode:
                best_decode[kv_dtype] = PrefillConfig(*json.loads(best))
            size = kv_bytes(case, num_kv_heads, head_dim, kv_cache.element_size())

            def gbps(seconds):
                return size / seconds / 1e9 if seconds else None
            row = {"case": case.name, "decode": decode, "kv_dtype": kv_dtype, "kv_bytes": size, "engine_s": engine_s,
                   "engine_gbps": gbps(engine_s), "bf16_products_s": flat.pop("bf16 products", None),
                   "split_decodes_s": flat.pop("split decodes", None),
                   "split_decodes_best_decode_s": flat.pop("split decodes, best decode config", None),
                   "configs_s": flat, "best_config": best, "best_config_s": timed.get(best)}
            rows.append(row)
            fraction = stream and engine_s and gbps(engine_s) / stream

            def cell(value, fmt):
                return "-" if value is None else format(value, fmt)

            def us(seconds):
                return cell(seconds and seconds * 1e6, ".1f")
            print(f"{case.name} | {kv_dtype} | {size / 1e6:.1f} | {engine_s * 1e6:.1f} | {cell(gbps(engine_s), '.0f')}"
                  f" | {cell(fraction, '.0%')} | {us(row['bf16_products_s'])} | {us(row['split_decodes_s'])} | "
                  f"{us(row['split_decodes_best_decode_s'])}"
                  f" | {best or '-'} | {cell(best and timed[best] * 1e6, '.1f')} | "
                  f"{cell(best and gbps(timed[best]), '.0f')}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    group_pad = 1 << (num_heads // num_kv_heads - 1).bit_length()
    best = best_decode_config(rows)
    print(f"best decode configuration {best}")
    if args.write_config and best is not None:
        name = triton_attention.attention_config_file_name(torch.cuda.get_device_name() if device == "cuda" else "cpu")
        key = triton_attention.prefill_shape_key(head_dim, group_pad)
        targets = [os.path.join(args.out, name)] + ([os.path.join(CONFIG_DIR, name)] if device == "cuda" else [])
        for path in targets:
            write_decode_config(path, torch.cuda.get_device_name() if device == "cuda" else "cpu", key, best)
            print(f"wrote {path}")
    with open(os.path.join(args.out, "attention_bandwidth.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                   "shape": [num_heads, num_kv_heads, head_dim], "stream_read_gbps": stream,
                   "engine_prefill_config": triton_attention.prefill_config(
                       torch.device(device), head_dim, group_pad).as_list(), "best_decode_config": best,
                   "cases": rows}, f, indent=1)


if __name__ == "__main__":
    main()
