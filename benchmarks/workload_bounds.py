"""How fast could any engine run the peer suite's workloads on this GPU? Lower bounds on their time (issue 23).

Each workload of benchmarks/peer_suite.py (the same prompts, output lengths, max_num_seqs and token budget) is
stepped through an ideal continuous-batching scheduler (every running request decodes a token each step; the
rest of the step's token budget prefills waiting prompts in order, in chunks), and each step is charged only
what its GEMMs and attention cannot avoid:

    GEMMs      max(linear FLOPs / matmul rate, weight bytes / bandwidth): every step reads every weight once
               (a mixture-of-experts model's: the dense ones and the experts its rows hit, model_shape.py)
    attention  decode rows' K/V bytes / bandwidth + prefill rows' causal attention FLOPs / matmul rate

Norms, rotary, sampling, launches and host time cost nothing, so no engine can beat the sum ("sequential": GEMMs
and attention are separate kernels in both engines). "strict" is the looser bound that lets every byte and
every FLOP overlap: max(all FLOPs / rate, all bytes / bandwidth). The rates are this GPU's measured best
(--measure times cuBLAS bf16 and float8 GEMMs and a streaming read; --rates reads them back), not datasheet
peaks; --measure also times cuBLAS on the model's own projections at each row count, and the "cuBLAS" bound
charges each step those times instead (a floor for an engine whose GEMMs are cuBLAS's, not for every kernel;
dense models only: an MoE layer's grouped GEMMs are not a cuBLAS call a projection). With a peer_suite.json
(--peer-suite) it prints the fraction of each bound each engine reached and what the issue's ratio goals over
vLLM (batch 1 1.1x, throughput 1.2x) would need. With gpu_suite.py JSONs (--gpu-suite, issue 17) it bounds each
run's own 512 x (512 in, 256 out) and model instead, and prints Serval's fraction of the bound, the most any
engine could reach over that run's transformers generate_batch, and the fraction of the bound 20x needs:

    python benchmarks/workload_bounds.py --measure --out results/bounds            # on the GPU (about 20 s)
    python benchmarks/workload_bounds.py --rates results/bounds/rates.json \
        --peer-suite docs/results/peer_suite_h200.json
    python benchmarks/workload_bounds.py --rates results/bounds/rates.json \
        --gpu-suite docs/results/gpu_suite_h200_mixtral_vs_hf_2026-12-03.json    # writes vs_transformers.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.model_shape import MoeShape, Shape, shape_from_config  # noqa: E402
from benchmarks.peer_suite import ROW_METRIC, draw_workloads  # noqa: E402 - the suite's own prompts and metrics


@dataclass
class Step:
    num_tokens: int  # rows through the GEMMs
    num_sampled: int  # rows through the LM head: decode rows and prompts that finish their prefill
    decode_keys: int  # keys the decode rows' attention reads (their contexts, the new token included)
    prefill_keys: int  # keys the prefill rows' causal attention multiplies by


def schedule(prompt_lens: list[int], output_lens: list[int], max_num_seqs: int, max_batched_tokens: int) -> list[Step]:
    """The steps of an ideal continuous-batching engine over the requests, all arriving at once."""
    steps = []
    waiting = list(range(len(prompt_lens)))[::-1]  # popped from the end: arrival order
    prefilled = [0] * len(prompt_lens)
    generated = [0] * len(prompt_lens)
    running: list[int] = []  # decoding
    prefilling: list[int] = []  # admitted, prompt not done
    while waiting or running or prefilling:
        budget = max_batched_tokens
        step = Step(0, 0, 0, 0)
        for request in running:  # every decoding request advances one token
            step.num_tokens += 1
            step.num_sampled += 1
            step.decode_keys += prompt_lens[request] + generated[request]
            generated[request] += 1
        budget -= len(running)
        while budget > 0 and (prefilling or (waiting and len(running) + len(prefilling) < max_num_seqs)):
            if not prefilling:
                prefilling.append(waiting.pop())
            request = prefilling[0]
            chunk = min(budget, prompt_lens[request] - prefilled[request])
            start = prefilled[request]
            step.num_tokens += chunk
            step.prefill_keys += chunk * start + chunk * (chunk + 1) // 2
            prefilled[request] += chunk
            budget -= chunk
            if prefilled[request] == prompt_lens[request]:  # its first token comes out of this step
                prefilling.pop(0)
                step.num_sampled += 1
                generated[request] = 1
                running.append(request)
            else:
                break  # the budget is spent
        running = [request for request in running if generated[request] < output_lens[request]]
        steps.append(step)
    return steps


def interpolate(table: dict, rows: int) -> float:
    """Milliseconds at `rows` from a measured {"rows": [...], "ms": [...]} (linear between the measured points)."""
    points = list(zip(table["rows"], table["ms"]))
    if rows <= points[0][0]:
        return points[0][1]
    for (r0, t0), (r1, t1) in zip(points, points[1:]):
        if rows <= r1:
            return t0 + (t1 - t0) * (rows - r0) / (r1 - r0)
    (r0, t0), (r1, t1) = points[-2], points[-1]
    return t1 + (t1 - t0) * (rows - r1) / (r1 - r0)


def bound(shape: Shape, precision: str, steps: list[Step], rates: dict) -> dict:
    """Seconds no engine can go below on these steps; rates: gemm_tflops per precision, bandwidth_gbs, and
    optionally gemm_ms (cuBLAS's measured time of one layer's projections and of the LM head by row count)."""
    rate = rates["gemm_tflops"][precision] * 1e12
    bandwidth = rates["bandwidth_gbs"] * 1e9
    kv_bytes = shape.kv_bytes_per_token(precision)
    # cuBLAS's times are of a dense layer's projections; an MoE layer's grouped GEMMs are not one cuBLAS call each
    measured = None if isinstance(shape, MoeShape) else rates.get("gemm_ms", {}).get(precision)
    gemm_s = attention_s = flops = bytes_read = cublas_s = 0.0
    for step in steps:
        weight_bytes = shape.weight_bytes(precision, step.num_tokens)
        gemm_flops = 2 * (shape.linear_params * step.num_tokens + shape.head_params * step.num_sampled)
        gemm_s += max(gemm_flops / rate, weight_bytes / bandwidth)
        if measured:
            cublas_s += (shape.num_layers * interpolate(measured["layer"], step.num_tokens)
                         + interpolate(measured["head"], step.num_sampled)) / 1e3
        step_kv = step.decode_keys * kv_bytes
        attention_flops = shape.attention_flops(step.decode_keys + step.prefill_keys)
        attention_s += step_kv / bandwidth + shape.attention_flops(step.prefill_keys) / rate
        flops += gemm_flops + attention_flops
        bytes_read += weight_bytes + step_kv
    result = {"num_steps": len(steps), "gemm_s": gemm_s, "attention_s": attention_s,
              "sequential_s": gemm_s + attention_s, "strict_s": max(flops / rate, bytes_read / bandwidth),
              "tflops": flops / 1e12, "tb_read": bytes_read / 1e12}
    if measured:
        result["cublas_gemm_s"] = cublas_s
        result["cublas_sequential_s"] = cublas_s + attention_s
    return result


def workload_bounds(model: str, settings: dict, rates: dict, precisions=("bf16", "fp8")) -> dict:
    """Per precision and peer-suite row: the bound's seconds and the metric's ceiling (tok/s)."""
    shape = shape_from_config(model)
    drawn = draw_workloads(shape.vocab_size, 1000)
    seqs, budget = int(settings["max_num_seqs"]), int(settings["max_num_batched_tokens"])
    new_tokens = int(settings.get("batch1_new_tokens", 256))
    workloads = {
        # batch-1 decode is timed over the tokens after the first: its prefill step is not in the metric
        "batch1": ([len(drawn["prompt_128"])], [new_tokens], new_tokens - 1),
        "1000": ([len(p) for p in drawn["prompts_1000"]], drawn["outputs_1000"], None),
        "512": ([len(p) for p in drawn["prompts_512"]], [int(settings.get("output_len_512", 256))] * 512, None),
    }
    return {f"{precision}-{name}": workload_bound(shape, precision, prompt_lens, output_lens, seqs, budget, rates,
                                                  ROW_METRIC[name], decode_tokens)
            for precision in precisions for name, (prompt_lens, output_lens, decode_tokens) in workloads.items()}


def workload_bound(shape: Shape, precision: str, prompt_lens: list[int], output_lens: list[int], max_num_seqs: int,
                   max_batched_tokens: int, rates: dict, metric: str, decode_tokens: int | None = None) -> dict:
    """One workload's bound and the ceilings it puts on `metric` (decode_tokens: a batch-1 metric's tokens, its
    prefill step left out)."""
    steps = schedule(prompt_lens, output_lens, max_num_seqs, max_batched_tokens)
    if decode_tokens is not None:
        steps = [step for step in steps if not step.prefill_keys]
    row = bound(shape, precision, steps, rates)
    row["input_tokens"], row["output_tokens"] = sum(prompt_lens), sum(output_lens)
    metric_tokens = {"decode_tokens_per_s": decode_tokens, "output_tokens_per_s": row["output_tokens"],
                     "total_tokens_per_s": row["input_tokens"] + row["output_tokens"]}[metric]
    row["metric"] = metric
    row["ceiling_sequential"] = metric_tokens / row["sequential_s"]
    row["ceiling_strict"] = metric_tokens / row["strict_s"]
    if "cublas_sequential_s" in row:
        row["ceiling_cublas"] = metric_tokens / row["cublas_sequential_s"]
    return row


MEASURED_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 192, 256, 320, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


def measure_rates(shape: Shape) -> dict:
    """On the current GPU: the best cuBLAS rates over a few large GEMMs (bf16, and float8 with per-tensor scales
    through torch._scaled_mm), the bandwidth of a streaming read, and cuBLAS's time for one layer's projections
    and for the LM head at each of MEASURED_ROWS rows (a dense model's only)."""
    import torch
    device = torch.device("cuda")
    one = torch.ones((), device=device)

    def timed(fn, repeats: int = 10) -> float:
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeats  # ms

    def matmul(precision: str, m: int, k: int, n: int):
        a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        if precision == "bf16":
            return lambda: a @ b.t()
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        if m % 16:  # _scaled_mm wants multiples of 16 rows: pad as a float8 GEMM engine would
            a8 = torch.zeros(-(-m // 16) * 16, k, device=device, dtype=torch.float8_e4m3fn)
        return lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

    best = {"bf16": 0.0, "fp8": 0.0}
    for m, k, n in [(8192, 4096, 14336), (8192, 14336, 4096), (4096, 4096, 28672), (8192, 4096, 6144)]:
        for precision in best:
            best[precision] = max(best[precision], 2 * m * n * k / timed(matmul(precision, m, k, n)) / 1e9)
    hidden, attention = shape.hidden_size, shape.num_heads * shape.head_dim
    projections = [(hidden, shape.head_dim * (shape.num_heads + 2 * shape.num_kv_heads)), (attention, hidden),
                   (hidden, 2 * shape.intermediate_size), (shape.intermediate_size, hidden)]
    gemm_ms = {}
    for precision in () if isinstance(shape, MoeShape) else best:  # bound() has no cuBLAS bound for experts
        layer = [sum(timed(matmul(precision, rows, k, n)) for k, n in projections) for rows in MEASURED_ROWS]
        head = [timed(matmul("bf16", rows, hidden, shape.vocab_size)) for rows in MEASURED_ROWS[:13]]
        gemm_ms[precision] = {"layer": {"rows": list(MEASURED_ROWS), "ms": layer},
                              "head": {"rows": list(MEASURED_ROWS[:13]), "ms": head}}
        torch.cuda.empty_cache()
    big = torch.ones(4 << 30, dtype=torch.uint8, device=device).view(torch.int64)  # 4 GiB, far past L2
    bandwidth = big.numel() * 8 / timed(lambda: big.sum()) / 1e6
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "gemm_tflops": best,
            "bandwidth_gbs": bandwidth, "gemm_ms": gemm_ms}


# The issue's goals over vLLM: batch 1 >= 1.1x, the throughput rows >= 1.2x.
GOALS = {"batch1": 1.1, "1000": 1.2, "512": 1.2}


def engine_fractions(bounds: dict, peer: dict) -> list[dict]:
    rows = []
    for name, row in bounds.items():
        precision = name.split("-")[0]
        measured = {engine: by_precision.get(precision, {}).get(name, {}).get(row["metric"])
                    for engine, by_precision in peer["engines"].items()}
        goal = GOALS[name.split("-")[1]]
        entry = {"row": name, "goal": goal, "ceiling_sequential": row["ceiling_sequential"],
                 "ceiling_cublas": row.get("ceiling_cublas")}
        for engine, value in measured.items():
            entry[engine] = value
            entry[f"{engine}_of_bound"] = value / row["ceiling_sequential"] if value else None
            if value and row.get("ceiling_cublas"):
                entry[f"{engine}_of_cublas_bound"] = value / row["ceiling_cublas"]
        if measured.get("vllm"):
            entry["goal_needs_of_bound"] = goal * measured["vllm"] / row["ceiling_sequential"]
            if row.get("ceiling_cublas"):
                entry["goal_needs_of_cublas_bound"] = goal * measured["vllm"] / row["ceiling_cublas"]
        rows.append(entry)
    return rows


def print_tables(bounds: dict, rates: dict, fractions: list[dict] | None) -> None:
    print(f"Rates: bf16 {rates['gemm_tflops']['bf16']:.0f} TFLOP/s, fp8 {rates['gemm_tflops']['fp8']:.0f} TFLOP/s, "
          f"{rates['bandwidth_gbs']:.0f} GB/s ({rates.get('device', 'given')})")
    print("| row | steps | TFLOP | TB read | GEMM s | cuBLAS GEMM s | attention s | sequential bound s | strict bound s "
          "| ceiling (sequential) | ceiling (cuBLAS) | ceiling (strict) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, row in bounds.items():
        print(f"| {name} | {row['num_steps']} | {row['tflops']:.1f} | {row['tb_read']:.2f} | {row['gemm_s']:.3f} | "
              f"{_cell(row.get('cublas_gemm_s'), '.3f')} | {row['attention_s']:.3f} | {row['sequential_s']:.3f} | "
              f"{row['strict_s']:.3f} | {row['ceiling_sequential']:,.1f} | {_cell(row.get('ceiling_cublas'))} | "
              f"{row['ceiling_strict']:,.1f} |")
    if not fractions:
        return
    print("\n| row | ceiling (sequential / cuBLAS) | Serval | of the ceilings | vLLM | of the ceilings | goal "
          "| the goal needs |")
    print("| --- | --- | ---: | --- | ---: | --- | ---: | --- |")
    for entry in fractions:
        def shares(prefix):
            return " / ".join(_cell(entry.get(key), ".1%") for key in (f"{prefix}of_bound", f"{prefix}of_cublas_bound"))
        print(f"| {entry['row']} | {entry['ceiling_sequential']:,.1f} / {_cell(entry['ceiling_cublas'])} | "
              f"{_cell(entry.get('serval'))} | {shares('serval_')} | {_cell(entry.get('vllm'))} | {shares('vllm_')} | "
              f"{entry['goal']}x vLLM | {shares('goal_needs_')} |")


# Issue 17's goal: Serval's 512 x (512 in, 256 out) output tok/s over transformers' generate_batch in the same run.
TRANSFORMERS_GOAL = 20
GPU_SUITE_PRECISION = {None: "bf16", "fp8": "fp8"}  # gpu_suite.py's quantization: the weight bytes charged


def versus_transformers(suite: dict, rates: dict) -> dict:
    """One gpu_suite.py run's 512 x (512, 256) (its sizes, sequences and token budget): the bounds on its output
    tok/s, Serval's fraction of them, the most any engine could reach over transformers' generate_batch, and the
    fraction of each bound the goal needs."""
    serval, hf = suite["serval_512x512x256"], suite.get("hf_generate_batch_512x512x256", {})
    count = serval["num_requests"]
    if serval["input_tokens"] % count or serval["output_tokens"] % count:
        raise ValueError("gpu_suite's 512 x (512, 256) has equal prompts and outputs; this run's do not divide evenly")
    if suite.get("quantization") not in GPU_SUITE_PRECISION:
        raise ValueError(f"quantization {suite.get('quantization')!r}: bounds know {list(GPU_SUITE_PRECISION)}")
    precision = GPU_SUITE_PRECISION[suite.get("quantization")]
    row = workload_bound(shape_from_config(suite["model"]), precision, [serval["input_tokens"] // count] * count,
                         [serval["output_tokens"] // count] * count, int(suite["max_num_seqs"]),
                         int(suite["max_num_batched_tokens"]), rates, "output_tokens_per_s")
    serval_rate, hf_rate = serval["output_tokens_per_s"], hf.get("output_tokens_per_s")
    entry = {"model": suite["model"], "precision": precision, "bound": row, "goal": TRANSFORMERS_GOAL,
             "serval": serval_rate, "transformers": hf_rate,
             "serval_over_transformers": serval_rate / hf_rate if hf_rate else None}
    for kind in ("sequential", "strict"):
        ceiling = row[f"ceiling_{kind}"]
        entry[f"serval_of_{kind}"] = serval_rate / ceiling
        entry[f"most_over_transformers_{kind}"] = ceiling / hf_rate if hf_rate else None
        entry[f"goal_needs_of_{kind}"] = TRANSFORMERS_GOAL * hf_rate / ceiling if hf_rate else None
    return entry


def print_versus_transformers(entries: list[dict], rates: dict) -> None:
    names = [f"{os.path.basename(entry['model'])} {entry['precision']}-512x512x256" for entry in entries]
    print_tables({name: entry["bound"] for name, entry in zip(names, entries)}, rates, None)
    print("\n| row | ceiling (sequential / strict) | Serval | of the ceilings | transformers "
          "| Serval over transformers | the most any engine could reach over transformers "
          f"| {TRANSFORMERS_GOAL}x needs of the ceilings |")
    print("| --- | --- | ---: | --- | ---: | ---: | --- | --- |")
    for name, entry in zip(names, entries):
        def pair(prefix, spec):
            return " / ".join(_cell(entry[f"{prefix}_{kind}"], spec) for kind in ("sequential", "strict"))
        print(f"| {name} | {entry['bound']['ceiling_sequential']:,.1f} / {entry['bound']['ceiling_strict']:,.1f} | "
              f"{entry['serval']:,.1f} | {pair('serval_of', '.1%')} | {_cell(entry['transformers'])} | "
              f"{_cell(entry['serval_over_transformers'], '.2f')}x | {pair('most_over_transformers', '.1f')}x | "
              f"{pair('goal_needs_of', '.1%')} |")


def _cell(value, spec: str = ",.1f") -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.path.join("benchmarks", "configs", "llama-3-8b"))
    parser.add_argument("--measure", action="store_true", help="time this GPU's GEMM rates and bandwidth")
    parser.add_argument("--rates", help="a rates.json written by --measure")
    parser.add_argument("--peer-suite", help="a peer_suite.json: the fraction of the bound each engine reached")
    parser.add_argument("--gpu-suite", action="append", default=[],
                        help="a gpu_suite.py JSON (repeat for several): its model's bound on 512 x (512, 256) against "
                        "its Serval and transformers rates, instead of the peer suite's rows")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--out", default="results/bounds")
    args = parser.parse_args()
    if args.measure:
        rates = measure_rates(shape_from_config(args.model))
    elif args.rates:
        with open(args.rates) as f:
            rates = json.load(f)
    else:
        parser.error("give --measure (on a GPU) or --rates FILE")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "rates.json"), "w") as f:
        json.dump(rates, f, indent=1)
    if args.gpu_suite:
        entries = []
        for path in args.gpu_suite:
            with open(path) as f:
                entries.append(dict(versus_transformers(json.load(f), rates), gpu_suite=path))
        print_versus_transformers(entries, rates)
        with open(os.path.join(args.out, "vs_transformers.json"), "w") as f:
            json.dump({"rates": rates, "entries": entries}, f, indent=1)
        return
    peer = None
    settings = {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens}
    if args.peer_suite:
        with open(args.peer_suite) as f:
            peer = json.load(f)
        settings = peer["settings"]
    bounds = workload_bounds(args.model, settings, rates)
    fractions = engine_fractions(bounds, peer) if peer else None
    print_tables(bounds, rates, fractions)
    with open(os.path.join(args.out, "workload_bounds.json"), "w") as f:
        json.dump({"model": args.model, "settings": settings, "rates": rates, "bounds": bounds,
                   "fractions": fractions}, f, indent=1)


if __name__ == "__main__":
    main()
