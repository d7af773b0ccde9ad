"""What the guard costs: per-rail added latency (p50/p99, in-process, as the server and router call it) and the
throughput of constrained decoding against unconstrained decoding of the same batch. Prints a table and writes JSON.

    python benchmarks/guard_overhead.py [--model PATH] [--batch 16] [--max-tokens 64] [--json guard_overhead.json]

Rails: each is timed (this thread's CPU time, and wall time) on a 1,000-character chat message, with and
without PII, over --iterations calls; the output rails per streamed chunk (a 1,000-character answer pushed 4
characters at a time, what a detokenized token is on average). Keys: authenticate + admit + release.

Decoding (on --threads torch threads): --batch prompts, each to --max-tokens tokens (ignore_eos), unconstrained
and under each constraint, stepped through the engine; the median decode step with the whole batch running
gives tokens/s (a constraint that completes early, like choice, counts only its full-batch steps). Cases are
interleaved over --rounds, each round starting at the next case, so a noisy machine slows them alike; the
table gives wall time and the process's CPU time per step (the cost on an otherwise idle machine). The mask
step (llguidance filling the batch's bitmask, then unpacking it) is also timed alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import torch

from serval.guard.guard import Guard, RequestContext
from serval.guard.keys import hash_key
from serval.guard.output import OutputFilter
from serval.guard.policy import parse_policy
from serval.guard.rails import deny_rail, injection_rail, pii_rail
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


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(call, iterations: int) -> tuple[list[float], list[float]]:
    """(wall seconds, this thread's CPU seconds) per call. CPU time is what the rail costs on an idle core;
    wall time adds whatever else the machine was doing."""
    wall, cpu = [], []
    for _ in range(iterations):
        started_wall, started_cpu = time.perf_counter(), time.thread_time()
        call()
        cpu.append(time.thread_time() - started_cpu)
        wall.append(time.perf_counter() - started_wall)
    return wall, cpu


def rail_latencies(iterations: int) -> list[dict]:
    policy = parse_policy(POLICY)
    rows = []
    for label, text in (("clean 1k chars", CLEAN), ("with PII 1k chars", WITH_PII)):
        texts = [text]
        rows.append(_row("input_deny", label, *timed(lambda: deny_rail(texts, policy.input_deny, "m"), iterations)))
        rows.append(_row("injection", label, *timed(lambda: injection_rail(texts, policy.injection, "m"),
                                                    iterations)))
        rows.append(_row("input_pii (redact)", label, *timed(lambda: pii_rail(texts, policy.input_pii, "m"),
                                                             iterations)))
    answer = (WITH_PII + " and that is darn good.")[:1000]
    chunks = [answer[start:start + 4] for start in range(0, len(answer), 4)]
    for rail, only in (("output_deny", dataclasses.replace(policy, output_pii=())),
                       ("output_pii", dataclasses.replace(policy, output_deny=()))):
        wall, cpu = [], []
        for _ in range(max(1, iterations // 20)):
            output_filter = OutputFilter(only, lambda decision: None, lambda rail, seconds: None)
            chunk_wall, chunk_cpu = timed_each(output_filter.push, chunks)
            wall += chunk_wall
            cpu += chunk_cpu
        rows.append(_row(rail, "per 4-char streamed chunk", wall, cpu))
    guard = Guard(policy)

    def one_request() -> None:
        key = guard.authenticate("Bearer sk-bench", RequestContext("bench"))
        guard.admit(key, "m", RequestContext("bench"))
        guard.release(key, 10, 10)

    rows.append(_row("keys", "authenticate+admit+release", *timed(one_request, iterations)))
    return rows


def timed_each(call, arguments: list) -> tuple[list[float], list[float]]:
    wall, cpu = [], []
    for argument in arguments:
        started_wall, started_cpu = time.perf_counter(), time.thread_time()
        call(argument)
        cpu.append(time.thread_time() - started_cpu)
        wall.append(time.perf_counter() - started_wall)
    return wall, cpu


def _row(rail: str, workload: str, wall: list[float], cpu: list[float]) -> dict:
    return {"rail": rail, "workload": workload, "calls": len(wall),
            "cpu_p50_us": percentile(cpu, 0.5) * 1e6, "cpu_p99_us": percentile(cpu, 0.99) * 1e6,
            "wall_p50_us": percentile(wall, 0.5) * 1e6, "wall_p99_us": percentile(wall, 0.99) * 1e6}


def decoding_throughput(model: str | None, batch: int, max_tokens: int, rounds: int) -> tuple[list[dict], dict]:
    """Median time of a decode step with the whole batch running, per case; cases interleaved over rounds so
    that a noisy machine slows them alike. Constraints that finish early only count their full-batch steps."""
    from serval import LLM
    from serval.engine import structured_output as structured
    llm = LLM(model=model, max_model_len=512, max_num_seqs=batch, seed=0)
    prompts = [f"Request {i}: describe a person as JSON." for i in range(batch)]
    cases = [("unconstrained", None),
             ("json_schema", StructuredOutputsParams(json=SCHEMA)),
             ("json_object", StructuredOutputsParams(json_object=True)),
             ("regex", StructuredOutputsParams(regex=r"[a-z ]*")),
             ("choice", StructuredOutputsParams(choice=["alpha", "beta", "gamma"]))]
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm up
    steps: dict[str, list[float]] = {name: [] for name, _ in cases}
    cpu_steps: dict[str, list[float]] = {name: [] for name, _ in cases}
    tokens: dict[str, int] = {name: 0 for name, _ in cases}
    for round_index in range(rounds):
        # Each round starts at a different case, so none always runs first (after a switch) or last.
        for name, constraint in cases[round_index % len(cases):] + cases[:round_index % len(cases)]:
            params = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=round_index,
                                    structured_outputs=constraint)
            engine = llm.engine
            for i, prompt in enumerate(prompts):
                engine.add_request(f"{name}-{round_index}-{i}", prompt, params)
            first = True
            while engine.has_unfinished_requests():
                running = engine.scheduler.num_running
                started, started_cpu = time.perf_counter(), time.process_time()
                outputs = engine.step()
                seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
                # Decode steps only (the first step is the batch's prefill), with every request still running.
                if not first and running == batch and engine.scheduler.num_running + _finished(outputs) == batch:
                    steps[name].append(seconds)
                    cpu_steps[name].append(cpu_seconds)
                first = False
                tokens[name] += sum(1 for o in outputs for c in o.outputs if c.token_ids)
    base = statistics.median(steps["unconstrained"])
    base_cpu = statistics.median(cpu_steps["unconstrained"])
    rows = []
    for name, _ in cases:
        step = statistics.median(steps[name]) if steps[name] else float("nan")
        cpu = statistics.median(cpu_steps[name]) if cpu_steps[name] else float("nan")
        rows.append({"case": name, "batch": batch, "decode_steps": len(steps[name]), "step_ms": step * 1e3,
                     "tokens_per_s": batch / step, "relative_throughput": base / step,
                     "cpu_ms_per_step": cpu * 1e3, "relative_cpu_throughput": base_cpu / cpu})
    # The mask step alone: a batch of fresh JSON-schema matchers, bitmask filled and unpacked.
    compiler = llm.engine.grammar_compiler()
    matchers = [compiler.compile(StructuredOutputsParams(json=SCHEMA)) for _ in range(batch)]
    vocab = compiler.ll_tokenizer.vocab_size
    wall, cpu = timed(lambda: structured.disallowed_mask(structured.fill_bitmask(matchers, vocab), vocab), 200)
    mask = {"batch": batch, "vocab_size": vocab, "cpu_p50_ms": percentile(cpu, 0.5) * 1e3,
            "wall_p50_ms": percentile(wall, 0.5) * 1e3, "wall_p99_ms": percentile(wall, 0.99) * 1e3}
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
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for decoding; 1 keeps CPU time per step honest on a shared machine "
                             "(idle OpenMP threads spin, which a busy machine turns into CPU time)")
    parser.add_argument("--json", default="guard_overhead.json")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    rails = rail_latencies(args.iterations)
    out = sys.stdout
    out.write(f"{'rail':<20} {'workload':<28} {'calls':>6} {'cpu p50 us':>11} {'cpu p99 us':>11} "
              f"{'wall p50 us':>12} {'wall p99 us':>12}\n")
    for row in rails:
        out.write(f"{row['rail']:<20} {row['workload']:<28} {row['calls']:>6} {row['cpu_p50_us']:>11.1f} "
                  f"{row['cpu_p99_us']:>11.1f} {row['wall_p50_us']:>12.1f} {row['wall_p99_us']:>12.1f}\n")
    model = args.model
    if model == "tiny":
        import tempfile
        model = build_tiny_model(tempfile.mkdtemp(prefix="serval-guard-bench-"))
    torch.set_num_threads(args.threads)
    decoding, mask = decoding_throughput(model, args.batch, args.max_tokens, args.rounds)
    out.write(f"\n{'decoding':<14} {'batch':>5} {'steps':>6} {'wall ms/step':>13} {'tok/s':>7} {'vs unconstr.':>13} "
              f"{'cpu ms/step':>12} {'cpu vs unconstr.':>17}\n")
    for row in decoding:
        out.write(f"{row['case']:<14} {row['batch']:>5} {row['decode_steps']:>6} {row['step_ms']:>13.1f} "
                  f"{row['tokens_per_s']:>7.1f} {row['relative_throughput']:>12.2f}x {row['cpu_ms_per_step']:>12.1f} "
                  f"{row['relative_cpu_throughput']:>16.2f}x\n")
    out.write(f"\nmask step (llguidance fill + unpack), batch {mask['batch']}, vocab {mask['vocab_size']}: "
              f"cpu p50 {mask['cpu_p50_ms']:.3f} ms, wall p50 {mask['wall_p50_ms']:.3f} ms\n")
    load_after = os.getloadavg()[0]
    out.write(f"load average (1 min) before / after: {load_before:.2f} / {load_after:.2f} on {os.cpu_count()} CPUs\n")
    with open(args.json, "w") as handle:
        json.dump({"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                               "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                               "load_average_before_after": [load_before, load_after]},
                   "args": vars(args), "rails": rails, "decoding": decoding, "mask_step": mask}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
