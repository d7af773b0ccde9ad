"""What a float8 linear layer costs a serving step, by the kind of scales its GEMM carries: torch._scaled_mm with
one scale per tensor (the rate workload_bounds.py charges), with a scale per token and per output channel (what
serval.layers.fp8.linear runs), and the per-token quantization before it (serval.kernels.triton_quant), for one
layer's projections of a model at the row counts of serving steps. Prints a table (ms per layer, TFLOP/s) and
writes JSON.

    python benchmarks/fp8_gemm_scales.py [--model benchmarks/configs/llama-3-8b] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.attention_tune import model_shape, time_call  # noqa: E402

ROWS = (16, 64, 256, 320, 512, 1024, 1280, 2048, 4096, 8192)
FP8 = torch.float8_e4m3fn


def timed_ms(fn, repeats: int = 20) -> float:
    """One CUDA graph of `repeats` calls, the median of five replays, in ms (launch gaps left out, as in the engine's
    graphs)."""
    return time_call(fn, repeats, "cuda") * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="benchmarks/configs/llama-3-8b")
    parser.add_argument("--out", default="results/fp8_gemm_scales")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a GPU (torch._scaled_mm's float8 path)")
    from serval.kernels import triton_quant
    with open(os.path.join(args.model, "config.json")) as f:
        config = json.load(f)
    num_heads, num_kv_heads, head_dim = model_shape(args.model)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    # (name, K, N, the input's width before quantization: gate_up's output feeds down through the gated quant)
    projections = [("qkv", hidden, head_dim * (num_heads + 2 * num_kv_heads)), ("o", num_heads * head_dim, hidden),
                   ("gate_up", hidden, 2 * inter), ("down", inter, hidden)]
    device = torch.device("cuda")
    weights = {name: (torch.randn(n, k, device=device) / k ** 0.5).to(FP8) for name, k, n in projections}
    channel_scales = {name: torch.rand(n, device=device) + 0.5 for name, k, n in projections}
    one = torch.ones((), device=device)
    rows_out = []
    print(f"float8 linear layers of {args.model} on {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("rows | per-tensor ms | TFLOP/s | per-token x per-channel ms | TFLOP/s | per-token x per-tensor ms | "
          "quantize ms | rowwise + quantize / per-tensor")
    for m in ROWS:
        tensor_ms = rowwise_ms = quant_ms = token_ms = 0.0
        token_error = None
        flops = 0
        for name, k, n in projections:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            if name == "down":
                x = torch.randn(m, 2 * k, device=device, dtype=torch.bfloat16)
            q, row_scale = triton_quant.quantize_rows(x, gated=name == "down")
            w = weights[name]
            tensor_ms += timed_ms(lambda: torch._scaled_mm(q, w.t(), scale_a=one, scale_b=one,
                                                           out_dtype=torch.bfloat16, use_fast_accum=True))
            rowwise_ms += timed_ms(lambda: torch._scaled_mm(q, w.t(), scale_a=row_scale,
                                                            scale_b=channel_scales[name].view(1, -1),
                                                            out_dtype=torch.bfloat16, use_fast_accum=True))
            try:  # per-token activations against one weight scale, if this torch's _scaled_mm takes the mix
                token_ms += timed_ms(lambda: torch._scaled_mm(q, w.t(), scale_a=row_scale, scale_b=one.view(1, 1),
                                                              out_dtype=torch.bfloat16, use_fast_accum=True))
            except Exception as error:  # noqa: BLE001 - recorded, not fatal
                token_ms, token_error = float("nan"), f"{type(error).__name__}: {str(error)[:160]}"
            quant_ms += timed_ms(lambda: triton_quant.quantize_rows(x, gated=name == "down"))
            flops += 2 * m * k * n
        row = {"rows": m, "per_tensor_ms": tensor_ms, "rowwise_ms": rowwise_ms, "quantize_ms": quant_ms,
               "per_token_x_tensor_ms": token_ms, "per_token_x_tensor_error": token_error,
               "per_tensor_tflops": flops / tensor_ms / 1e9, "rowwise_tflops": flops / rowwise_ms / 1e9}
        rows_out.append(row)
        print(f"{m} | {tensor_ms:.3f} | {row['per_tensor_tflops']:.0f} | {rowwise_ms:.3f} | "
              f"{row['rowwise_tflops']:.0f} | {token_ms:.3f} | {quant_ms:.3f} | "
              f"{(rowwise_ms + quant_ms) / tensor_ms:.2f}"
              + (f" ({token_error})" if token_error else ""), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fp8_gemm_scales.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model,
                   "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()
