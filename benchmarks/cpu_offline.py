"""Offline throughput on CPU: the default model, 32 chat prompts, 128 output tokens each.

Serval's LLM.generate next to transformers' batched generate on the same prompts and weights, in one run.
Both generate exactly --max-tokens tokens per prompt (EOS ignored), greedy, float32.

    python benchmarks/cpu_offline.py [--num-prompts 32] [--max-tokens 128] [--output results/cpu_offline.json]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--output", default="results/cpu_offline.json")
    args = parser.parse_args()
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
