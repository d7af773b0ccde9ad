"""What the guard costs: per-rail added latency (p50/p99, in-process, as the server and router call it) and the
throughput of constrained decoding against unconstrained decoding of the same batch. Prints a table and writes JSON.

    python benchmarks/guard_overhead.py [--model PATH] [--batch 16] [--max-tokens 64] [--json guard_overhead.json]

Rails: each is timed on a 1,000-character chat message (with and without PII) over --iterations calls; the
output rails are timed per streamed chunk (a 1,000-character answer pushed 4 characters at a time, what a
detokenized token is on average). Keys: authenticate + admit + release of one request.

Decoding: --batch prompts, each to --max-tokens tokens (ignore_eos), unconstrained and under each constraint,
stepped through the engine; the median decode step with the whole batch running gives tokens/s (a constraint
that completes early, like choice, counts only its full-batch steps). Cases are interleaved over --rounds so a
noisy machine slows them alike. The mask step (llguidance filling the batch's bitmask, then unpacking it) is
also timed alone.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from serval.guard.guard import Guard, RequestContext
from serval.guard.keys import hash_key
from serval.guard.policy import parse_policy
from serval.sampling_params import SamplingParams, StructuredOutputsParams

POLICY = f"""
keys: [{{id: bench, sha256: {hash_key("sk-bench")}, requests_per_minute: 100000000, tokens_per_minute: 100000000,
        token_budget: 100000000000, max_concurrent_requests: 1000}}]
input:
  max_prompt_tokens: 100000
  deny:
    - {{name: weapons, pattern: "build an? (bomb|weapon|explosive)", action: block}}
    - {{name: drugs, pattern: "synthesi[sz]e (meth|fentanyl)", action: block}}
    - {{name: self_harm, pattern: "how (do|can) i hurt myself", action: block}}
  pii: {{action: redact}}
  injection: {{action: log, threshold: 0.5}}
output:
  deny: [{{name: profanity, pattern: "\\\\b(darn|heck)\\\\b", action: redact}}]
  pii: {{action: redact}}
"""
PROSE = ("The quarterly report shows steady growth across all regions, with the northern division leading "
         "on new contracts while the southern team focused on retention. Costs held flat despite inflation, ")
CLEAN = (PROSE * 6)[:1000]
WITH_PII = (PROSE * 3)[:450] + " Contact jane.doe@example.com or +1 415-555-0132; card 4111 1111 1111 1111. " + \
    (PROSE * 3)[:450]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}}}}


class Timings:
    def __init__(self) -> None:
        self.by_rail: dict[str, list[float]] = {}

    def decision(self, decision, ctx) -> None:
        pass

    def latency(self, rail: str, seconds: float, ctx) -> None:
        self.by_rail.setdefault(rail, []).append(seconds)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rail_latencies(iterations: int) -> list[dict]:
    guard = Guard(parse_policy(POLICY))
    timings = Timings()
    guard.observers.append(timings)
    rows = []
    for label, text in (("clean 1k chars", CLEAN), ("with PII 1k chars", WITH_PII)):
        timings.by_rail.clear()
        for _ in range(iterations):
            guard.check_input([text], RequestContext("bench"), "messages")
        for rail, values in sorted(timings.by_rail.items()):
            rows.append(_row(f"input: {rail}", label, values))
    answer = (WITH_PII + " and that is darn good.")[:1000]
    timings.by_rail.clear()
    for _ in range(max(1, iterations // 10)):
        output_filter = guard.output_filter(RequestContext("bench"))
        for start in range(0, len(answer), 4):
            output_filter.push(answer[start:start + 4])
        output_filter.finish()
    for rail, values in sorted(timings.by_rail.items()):
        rows.append(_row(f"output: {rail}", "per 4-char chunk, PII in text", values))
    key_times = []
    for _ in range(iterations):
        started = time.perf_counter()
        key = guard.authenticate("Bearer sk-bench", RequestContext("bench"))
        guard.admit(key, "m", RequestContext("bench"))
        guard.release(key, 10, 10)
        key_times.append(time.perf_counter() - started)
    rows.append(_row("keys: authenticate+admit+release", "one request", key_times))
    return rows


def _row(rail: str, workload: str, values: list[float]) -> dict:
    return {"rail": rail, "workload": workload, "calls": len(values), "p50_us": percentile(values, 0.5) * 1e6,
            "p99_us": percentile(values, 0.99) * 1e6, "mean_us": statistics.fmean(values) * 1e6}


def decoding_throughput(model: str | None, batch: int, max_tokens: int, rounds: int) -> tuple[list[dict], dict]:
    """Median time of a decode step with the whole batch running, per case; cases interleaved over rounds so
    that a noisy machine slows them alike. Constraints that finish early only count their full-batch steps."""
    from serval import LLM
    from serval.guard import structured
    llm = LLM(model=model, max_model_len=512, max_num_seqs=batch, seed=0)
    prompts = [f"Request {i}: describe a person as JSON." for i in range(batch)]
    cases = [("unconstrained", None),
             ("json_schema", StructuredOutputsParams(json=SCHEMA)),
             ("json_object", StructuredOutputsParams(json_object=True)),
             ("regex", StructuredOutputsParams(regex=r"[a-z ]*")),
             ("choice", StructuredOutputsParams(choice=["alpha", "beta", "gamma"]))]
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm up
    steps: dict[str, list[float]] = {name: [] for name, _ in cases}
    tokens: dict[str, int] = {name: 0 for name, _ in cases}
    for round_index in range(rounds):
        for name, constraint in cases:
            params = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=round_index,
                                    structured_outputs=constraint)
            engine = llm.engine
            for i, prompt in enumerate(prompts):
                engine.add_request(f"{name}-{round_index}-{i}", prompt, params)
            first = True
            while engine.has_unfinished_requests():
                running = engine.scheduler.num_running
                started = time.perf_counter()
                outputs = engine.step()
                seconds = time.perf_counter() - started
                # Decode steps only (the first step is the batch's prefill), with every request still running.
                if not first and running == batch and engine.scheduler.num_running + _finished(outputs) == batch:
                    steps[name].append(seconds)
                first = False
                tokens[name] += sum(1 for o in outputs for c in o.outputs if c.token_ids)
    base = statistics.median(steps["unconstrained"])
    rows = []
    for name, _ in cases:
        step = statistics.median(steps[name]) if steps[name] else float("nan")
        rows.append({"case": name, "batch": batch, "decode_steps": len(steps[name]), "step_ms": step * 1e3,
                     "tokens_per_s": batch / step, "relative_throughput": base / step})
    # The mask step alone: a batch of fresh JSON-schema matchers, bitmask filled and unpacked.
    matchers = [structured.compile_matcher(StructuredOutputsParams(json=SCHEMA), llm.engine.tokenizer)
                for _ in range(batch)]
    vocab = structured.ll_tokenizer(llm.engine.tokenizer).vocab_size
    times = []
    for _ in range(200):
        started = time.perf_counter()
        bitmask = structured.fill_bitmask(matchers, vocab)
        structured.allowed_mask(bitmask, vocab)
        times.append(time.perf_counter() - started)
    mask = {"batch": batch, "vocab_size": vocab, "p50_ms": percentile(times, 0.5) * 1e3,
            "p99_ms": percentile(times, 0.99) * 1e3}
    return rows, mask


def _finished(outputs) -> int:
    return sum(1 for o in outputs for c in o.outputs if c.finish_reason is not None)


def build_tiny_model(path: str) -> str:
    """A 2-layer, 64-wide random Llama with SmolLM2's tokenizer: the model costs ~nothing, so the grammar's share
    of a step is as large as it gets (the same model the server tests use)."""
    import os

    import transformers

    from serval.model.default_model import default_model_path
    gguf = default_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    tokenizer.save_pretrained(path)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None,
                        help="model path (default: SmolLM2-135M-Instruct); 'tiny': a random 2-layer model, same vocab")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of the decoding cases")
    parser.add_argument("--json", default="guard_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    rails = rail_latencies(args.iterations)
    out = sys.stdout
    out.write(f"{'rail':<36} {'workload':<32} {'calls':>6} {'p50 us':>9} {'p99 us':>9}\n")
    for row in rails:
        out.write(f"{row['rail']:<36} {row['workload']:<32} {row['calls']:>6} {row['p50_us']:>9.1f} "
                  f"{row['p99_us']:>9.1f}\n")
    model = args.model
    if model == "tiny":
        import tempfile
        model = build_tiny_model(tempfile.mkdtemp(prefix="serval-guard-bench-"))
    decoding, mask = decoding_throughput(model, args.batch, args.max_tokens, args.rounds)
    out.write(f"\n{'decoding':<16} {'batch':>6} {'steps':>6} {'step ms p50':>12} {'tok/s':>8} {'vs unconstrained':>17}\n")
    for row in decoding:
        out.write(f"{row['case']:<16} {row['batch']:>6} {row['decode_steps']:>6} {row['step_ms']:>12.1f} "
                  f"{row['tokens_per_s']:>8.1f} {row['relative_throughput']:>16.2f}x\n")
    out.write(f"\nmask step (fill + unpack), batch {mask['batch']}, vocab {mask['vocab_size']}: "
              f"p50 {mask['p50_ms']:.2f} ms, p99 {mask['p99_ms']:.2f} ms\n")
    with open(args.json, "w") as handle:
        json.dump({"machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                               "torch": torch.__version__},
                   "args": vars(args), "rails": rails, "decoding": decoding, "mask_step": mask}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
