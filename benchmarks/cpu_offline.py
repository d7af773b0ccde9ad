"""Offline throughput on CPU: the default model, 32 chat prompts, 128 output tokens each.

Serval's LLM.generate next to transformers' batched generate on the same prompts and weights, in one run.
Both generate exactly --max-tokens tokens per prompt (EOS ignored), greedy, float32.

    python benchmarks/cpu_offline.py [--num-prompts 32] [--max-tokens 128] [--output results/cpu_offline.json]

--decode: batch-1 decode tok/s and 16-stream throughput of Serval with the GGUF's 4-bit projections kept packed
(the default) and dequantized to float32 (SERVAL_GGUF_DEQUANTIZE=1), transformers' batch-1 decode, and
llama.cpp's (llama-cpp-python, same GGUF, same thread count) when it is installed; weight memory of each Serval
variant. Rounds alternate between the engines so that other work on a shared machine hits them alike.

    python benchmarks/cpu_offline.py --decode [--max-tokens 64] [--rounds 2] [--output results/cpu_decode.json]

--kernels: microseconds per call of one 1536 x 576 projection (the default model's gate/up) through the float32
matmul, torch's int4 CPU kernel with bfloat16, float32 and float16 activations, and a bfloat16 dense matmul, at
1, 16 and 64 rows: which CPU path the packed GGUF format should take.

    python benchmarks/cpu_offline.py --kernels
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
import transformers

from serval import LLM, SamplingParams
from serval.model.default_model import default_model_path

TOPICS = ["the ocean", "a city at night", "volcanoes", "the history of tea", "black holes", "bees", "chess openings",
          "the Roman empire", "photosynthesis", "jazz", "glaciers", "the printing press", "octopuses", "deserts",
          "the moon landing", "bread baking", "rainforests", "electric cars", "origami", "the Silk Road",
          "whales", "thunderstorms", "the internet", "coffee", "mountaineering", "tides", "coral reefs",
          "ancient Egypt", "bicycles", "northern lights", "honey", "lighthouses"]


def conversations(count: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Write a short essay about {TOPICS[i % len(TOPICS)]}."}] for i in range(count)]


def run_serval(convs, max_tokens: int) -> dict:
    started = time.perf_counter()
    llm = LLM()
    load_s = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.chat(convs[:2], params.clone(max_tokens=4), use_tqdm=False)  # warm-up
    started = time.perf_counter()
    outputs = llm.chat(convs, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    return {"engine": "serval", "load_s": load_s, "elapsed_s": elapsed, "output_tokens": generated,
            "prompt_tokens": prompt_tokens, "output_tokens_per_s": generated / elapsed,
            "first_output": outputs[0].outputs[0].token_ids}


def run_transformers(convs, max_tokens: int) -> dict:
    path = default_model_path()
    started = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    load_s = time.perf_counter() - started
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    elapsed = time.perf_counter() - started
    generated = (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
    return {"engine": "transformers", "load_s": load_s, "elapsed_s": elapsed, "output_tokens": generated,
            "prompt_tokens": int(batch["attention_mask"].sum()), "output_tokens_per_s": generated / elapsed,
            "first_output": out[0, batch["input_ids"].shape[1]:].tolist()}


DECODE_PROMPT = [{"role": "user", "content": "Write a short essay about the ocean."}]
STREAMS = 16


def serval_decode(dequantize: bool, max_tokens: int, rounds: int) -> dict:
    """Batch-1 decode tok/s (one request; prefill excluded by timing from the first token) and 16-stream tok/s."""
    from serval.model.loader import GGUF_DEQUANTIZE_ENV
    os.environ[GGUF_DEQUANTIZE_ENV] = "1" if dequantize else "0"
    llm = LLM(max_model_len=1024, num_gpu_blocks_override=16 * 1024 // 16 + 64)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.chat([DECODE_PROMPT], params.clone(max_tokens=4), use_tqdm=False)  # warm-up
    single, many = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        llm.chat([DECODE_PROMPT], params.clone(max_tokens=1), use_tqdm=False)
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        llm.chat([DECODE_PROMPT], params, use_tqdm=False)
        single.append((max_tokens - 1) / (time.perf_counter() - started - prefill))
        started = time.perf_counter()
        outputs = llm.chat(conversations(STREAMS), params, use_tqdm=False)
        many.append(sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - started))
    weights = llm.engine.memory_usage().weight_bytes
    del llm
    return {"engine": "serval (GGUF dequantized, float32)" if dequantize else "serval (GGUF 4-bit packed)",
            "batch1_tok_s": max(single), "streams16_tok_s": max(many), "weight_mib": weights / 2**20}


def transformers_decode(max_tokens: int, rounds: int) -> dict:
    path = default_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(DECODE_PROMPT, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    rates = []
    with torch.inference_mode():
        for _ in range(rounds):
            started = time.perf_counter()
            model.generate(ids, max_new_tokens=1, do_sample=False)
            prefill = time.perf_counter() - started
            started = time.perf_counter()
            model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            rates.append((max_tokens - 1) / (time.perf_counter() - started - prefill))
    return {"engine": "transformers (float32)", "batch1_tok_s": max(rates), "streams16_tok_s": None,
            "weight_mib": sum(p.nbytes for p in model.parameters()) / 2**20}


def llama_cpp_decode(max_tokens: int, rounds: int) -> dict | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=default_model_path(), n_threads=torch.get_num_threads(), n_ctx=1024,
                          verbose=False)
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        llm.create_chat_completion(DECODE_PROMPT, max_tokens=1, temperature=0.0)
        prefill = time.perf_counter() - started
        llm.reset()
        started = time.perf_counter()
        out = llm.create_chat_completion(DECODE_PROMPT, max_tokens=max_tokens, temperature=0.0)
        tokens = out["usage"]["completion_tokens"]
        rates.append((tokens - 1) / (time.perf_counter() - started - prefill))
        llm.reset()
    return {"engine": f"llama.cpp {llama_cpp.__version__} (Q4_1 as stored)", "batch1_tok_s": max(rates),
            "streams16_tok_s": None, "weight_mib": os.path.getsize(default_model_path()) / 2**20}


def decode_main(args) -> None:
    results = [serval_decode(False, args.max_tokens, args.rounds), serval_decode(True, args.max_tokens, args.rounds),
               transformers_decode(args.max_tokens, args.rounds)]
    llama = llama_cpp_decode(args.max_tokens, args.rounds)
    if llama is not None:
        results.append(llama)
    print(f"\nCPU decode: default model (SmolLM2-135M-Instruct Q4_1 GGUF), {args.max_tokens} tokens, "
          f"{torch.get_num_threads()} threads, best of {args.rounds}")
    print(f"{'engine':<40}{'batch-1 tok/s':>14}{'16 streams tok/s':>18}{'weights MiB':>13}")
    for r in results:
        many = f"{r['streams16_tok_s']:.1f}" if r["streams16_tok_s"] is not None else "-"
        print(f"{r['engine']:<40}{r['batch1_tok_s']:>14.1f}{many:>18}{r['weight_mib']:>13.0f}")
    if llama is None:
        print("(llama-cpp-python is not installed: `pip install llama-cpp-python` adds llama.cpp to the table)")
    write_summary(args.output, {"benchmark": "cpu_decode", "torch": torch.__version__,
                                "threads": torch.get_num_threads(), "max_tokens": args.max_tokens,
                                "results": results})


def kernel_choice() -> None:
    n, k, group = 1536, 576, 32
    weight = torch.randn(n, k)
    packed = torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 2)
    scales_and_zeros = torch.rand(k // group, n, 2) * 0.01

    def best_us(call, calls: int = 50) -> float:
        call()
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(calls):
                call()
            best = min(best, (time.perf_counter() - started) / calls * 1e6)
        return best

    print(f"{'rows':>5}{'f32 mm':>10}{'int4 bf16':>11}{'int4 f32':>10}{'int4 f16':>10}{'bf16 mm':>9}  (us per call)")
    for rows in (1, 16, 64):
        x = torch.randn(rows, k)
        times = [best_us(lambda: x @ weight.t())]
        for dtype in (torch.bfloat16, torch.float32, torch.float16):
            xd, sz = x.to(dtype), scales_and_zeros.to(dtype)
            times.append(best_us(lambda: torch._weight_int4pack_mm_for_cpu(xd, packed, group, sz), 5))
        wb, xb = weight.bfloat16(), x.bfloat16()
        times.append(best_us(lambda: xb @ wb.t(), 5))
        print(f"{rows:>5}" + "".join(f"{t:>10.0f}" for t in times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--output", default=None)
    parser.add_argument("--decode", action="store_true", help="batch-1 decode and 16 streams (see above)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kernels", action="store_true", help="the CPU kernel comparison (see above)")
    args = parser.parse_args()
    if args.kernels:
        return kernel_choice()
    if args.decode:
        args.output = args.output or "results/cpu_decode.json"
        return decode_main(args)
    args.output = args.output or "results/cpu_offline.json"
    convs = conversations(args.num_prompts)
    results = [run_serval(convs, args.max_tokens), run_transformers(convs, args.max_tokens)]
    serval, hf = results
    print(f"\nCPU offline throughput: default model (SmolLM2-135M-Instruct Q4_1 GGUF, float32), "
          f"{args.num_prompts} chat prompts x {args.max_tokens} output tokens, {torch.get_num_threads()} threads")
    print(f"{'engine':<14}{'load s':>9}{'run s':>9}{'out tok':>9}{'out tok/s':>11}")
    for r in results:
        print(f"{r['engine']:<14}{r['load_s']:>9.1f}{r['elapsed_s']:>9.1f}{r['output_tokens']:>9}"
              f"{r['output_tokens_per_s']:>11.1f}")
    print(f"serval / transformers: {serval['output_tokens_per_s'] / hf['output_tokens_per_s']:.2f}x; "
          f"first prompt's greedy tokens equal: {serval['first_output'] == hf['first_output']}")
    summary = {"benchmark": "cpu_offline", "machine": platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "num_prompts": args.num_prompts,
               "max_tokens": args.max_tokens, "results": [{k: v for k, v in r.items() if k != "first_output"}
                                                          for r in results]}
    write_summary(args.output, summary)


def write_summary(path: str, summary: dict) -> None:
    """The benchmark's JSON at path (its folder made if need be)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
