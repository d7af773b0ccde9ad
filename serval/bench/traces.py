"""torch.profiler Chrome traces (.json or .json.gz) read back: GPU time by kind of kernel (summarize_kernels, for
the peer suite's engine comparisons) and, for a serving engine's trace (serval.engine.profiler), where each step's
host time goes and what the GPU does meanwhile (summarize_steps). No torch import: plain JSON.

summarize_steps cuts the trace into engine steps at each `serval.step` range of the engine thread (a step's window
runs to the next step's start, so the hand-off between steps counts). In each window the GPU is busy where some
kernel, copy or memset runs; the rest is idle, and each idle instant is charged to the innermost `serval.*` range
the engine thread was in at that instant ("between steps" outside any). "GPU idle while the engine thread is in
serval.grammar_join: 1.2 ms/step" then says the step waited for the grammar's masks with nothing queued on the GPU.
"""
from __future__ import annotations

import gzip
import json
from bisect import bisect_left, bisect_right
from collections import Counter, defaultdict
from dataclasses import dataclass

STEP_RANGE = "serval.step"
RANGE_PREFIX = "serval."
OUTSIDE_RANGES = "between steps"
_GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")

# First match wins: attention kernels are named flash/fmha even when built on CUTLASS.
KERNEL_KINDS = (
    ("attention", ("attention", "attn", "flash", "fmha", "paged", "combine_splits", "reshape_and_cache",
                   "write_kv", "rotary")),
    ("sampling", ("sampl", "topk", "top_k", "argmax", "sort", "softmax", "gumbel", "exponential", "penalt",
                  "multinomial", "logprob")),
    ("quantization", ("quant", "scaled_fp8", "per_token")),
    ("gemm", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "sm90_", "sm80_", "cublas", "matmul", "_mm_",
              "scaled_mm", "w4a16", "fp8_block", "wgmma", "splitk", "::mm", "::addmm", "::bmm")),
)


@dataclass
class Kernel:
    name: str
    start_us: float
    duration_us: float


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, needles in KERNEL_KINDS:
        if any(needle in lowered for needle in needles):
            return kind
    return "other kernels"


def summarize_kernels(kernels: list[Kernel], wall_s: float | None = None) -> dict:
    """GPU time per kind of kernel, and host gaps: the span from the first kernel's start to the last one's end
    that no kernel covers (launch overhead, scheduling, the host waiting), all in ms and as shares of the span."""
    if not kernels:
        return {"error": "no GPU kernels in the trace"}
    kernels = sorted(kernels, key=lambda k: k.start_us)
    by_kind: dict[str, float] = {}
    by_name: dict[str, float] = {}
    busy, covered_until = 0.0, float("-inf")
    for kernel in kernels:
        kind = kernel_kind(kernel.name)
        by_kind[kind] = by_kind.get(kind, 0.0) + kernel.duration_us
        by_name[kernel.name] = by_name.get(kernel.name, 0.0) + kernel.duration_us
        end = kernel.start_us + kernel.duration_us
        if end > covered_until:
            busy += end - max(kernel.start_us, covered_until)
            covered_until = end
    span = covered_until - kernels[0].start_us
    kinds = {kind: {"ms": us / 1e3, "share": us / span} for kind, us in sorted(by_kind.items(), key=lambda i: -i[1])}
    kinds["host gaps"] = {"ms": (span - busy) / 1e3, "share": (span - busy) / span}
    top = sorted(by_name.items(), key=lambda i: -i[1])[:15]
    return {"span_ms": span / 1e3, "wall_s": wall_s, "num_kernels": len(kernels), "kinds": kinds,
            "top_kernels": [{"name": name[:120], "ms": us / 1e3, "kind": kernel_kind(name)} for name, us in top]}


def load_chrome_trace(path: str) -> list[dict]:
    """The trace's events."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def kernels_from_events(events: list[dict]) -> list[Kernel]:
    return [Kernel(e["name"], float(e["ts"]), float(e.get("dur", 0.0))) for e in events
            if e.get("ph") == "X" and e.get("cat") == "kernel"]


def kernels_from_chrome_trace(path: str) -> list[Kernel]:
    """The GPU kernels of a torch.profiler Chrome trace (.json or .json.gz), as vLLM's worker writes them."""
    return kernels_from_events(load_chrome_trace(path))


# ---- a serving engine's steps ----

class _BusyTime:
    """The union of the GPU's activity intervals, asked how much of [a, b] it covers."""

    def __init__(self, intervals: list[tuple[float, float]]) -> None:
        merged: list[list[float]] = []
        for start, end in sorted(intervals):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self.starts = [start for start, _ in merged]
        self.ends = [end for _, end in merged]
        self.before = [0.0]  # busy time of the intervals before each one
        for start, end in merged:
            self.before.append(self.before[-1] + end - start)

    def until(self, t: float) -> float:
        i = bisect_right(self.starts, t)
        if i == 0:
            return 0.0
        return self.before[i - 1] + min(t, self.ends[i - 1]) - self.starts[i - 1]

    def within(self, a: float, b: float) -> float:
        return self.until(b) - self.until(a)


def _innermost_segments(ranges: list[tuple[str, float, float]], start: float, end: float):
    """[start, end) cut where any range starts or ends: (name of the innermost range covering the piece, a, b).
    Innermost: the latest to start (nested ranges start inside their parent), of two that start together the
    first to end."""
    cuts = sorted({start, end, *(t for _, a, b in ranges for t in (a, b) if start < t < end)})
    for a, b in zip(cuts, cuts[1:]):
        middle = (a + b) / 2
        covering = [(r_start, -r_end, name) for name, r_start, r_end in ranges if r_start <= middle < r_end]
        yield (max(covering)[2] if covering else OUTSIDE_RANGES), a, b


def _thread_names(events: list[dict]) -> dict:
    return {e.get("tid"): e.get("args", {}).get("name", "") for e in events
            if e.get("ph") == "M" and e.get("name") == "thread_name"}


NO_STEPS = f"no {STEP_RANGE} range in the trace: no engine step ran while it was recorded"


def _engine_ranges(events: list[dict]) -> tuple[list[dict], int | None]:
    """Every `serval.*` range of the trace, and the engine thread: the one with the most step ranges (None: none)."""
    ranges = [e for e in events if e.get("ph") == "X" and e.get("cat") == "user_annotation"
              and str(e.get("name", "")).startswith(RANGE_PREFIX)]
    step_tids = Counter(e["tid"] for e in ranges if e["name"] == STEP_RANGE)
    return ranges, (step_tids.most_common(1)[0][0] if step_tids else None)


def summarize_steps(events: list[dict]) -> dict:
    """Per engine step (ms, means over the trace's steps): the window, GPU busy and idle, GPU idle by the engine
    thread's innermost range, and every `serval.*` range's time per step by thread ("engine" for the step
    thread, the others by their names)."""
    ranges, engine_tid = _engine_ranges(events)
    if engine_tid is None:
        return {"error": NO_STEPS}
    steps = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in ranges
                   if e["tid"] == engine_tid and e["name"] == STEP_RANGE)
    windows = [(start, following[0]) for (start, _), following in zip(steps, steps[1:])] + [steps[-1]]
    engine_ranges = sorted((e["name"], float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in ranges
                           if e["tid"] == engine_tid)
    gpu = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in events
           if e.get("ph") == "X" and e.get("cat") in _GPU_CATEGORIES]
    busy = _BusyTime(gpu)
    idle_by_range: dict[str, float] = defaultdict(float)
    total_busy = total_window = 0.0
    for start, end in windows:
        inside = [r for r in engine_ranges if r[1] < end and r[2] > start]
        for name, a, b in _innermost_segments(inside, start, end):
            idle_by_range[name] += (b - a) - busy.within(a, b)
        total_busy += busy.within(start, end)
        total_window += end - start
    num_steps = len(windows)
    names = _thread_names(events)
    by_thread: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e in ranges:
        thread = "engine" if e["tid"] == engine_tid else names.get(e["tid"]) or f"tid {e['tid']}"
        by_thread[thread][e["name"]] += float(e.get("dur", 0.0))

    def per_step_ms(us: float) -> float:
        return us / 1e3 / num_steps

    return {
        "num_steps": num_steps, "has_gpu_activity": bool(gpu),
        "step_ms": per_step_ms(total_window), "gpu_busy_ms": per_step_ms(total_busy),
        "gpu_idle_ms": per_step_ms(total_window - total_busy),
        "gpu_idle_by_engine_range_ms": {name: per_step_ms(us) for name, us
                                        in sorted(idle_by_range.items(), key=lambda item: -item[1])},
        "ranges_ms_per_step": {thread: {name: per_step_ms(us) for name, us
                                        in sorted(totals.items(), key=lambda item: -item[1])}
                               for thread, totals in sorted(by_thread.items(), key=lambda item: item[0] != "engine")},
    }


def format_step_summary(summary: dict, title: str) -> str:
    if "error" in summary:
        return f"{title}: {summary['error']}"
    lines = [f"{title}: {summary['num_steps']} steps, {summary['step_ms']:.3f} ms/step, GPU busy "
             f"{summary['gpu_busy_ms']:.3f} ms, idle {summary['gpu_idle_ms']:.3f} ms"
             + ("" if summary["has_gpu_activity"] else " (no GPU activity in the trace)")]
    lines += [f"  GPU idle while the engine thread is in {name}: {ms:.3f} ms/step"
              for name, ms in summary["gpu_idle_by_engine_range_ms"].items()]
    for thread, ranges in summary["ranges_ms_per_step"].items():
        lines.append(f"  {thread} thread: " + ", ".join(f"{name} {ms:.3f}" for name, ms in ranges.items())
                     + " (ms/step)")
    return "\n".join(lines)


# Triton launches through the driver (cuLaunchKernelEx, "cuda_driver" in the trace), torch's kernels and graph
# replays through the runtime: counting only the runtime missed every Triton kernel of an eager step.
_LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")


def step_windows(events: list[dict], top: int = 10) -> dict:
    """Every engine step's window (as summarize_steps cuts them): its wall time, GPU busy time, and the launches
    its engine thread made (graph replays and single kernels, from the CUDA runtime and driver rows), as
    percentiles over the trace and the `top` longest steps with their engine ranges and their kernels' time by
    kind (kernel_kind, by start time; overlapping kernels each count whole). A slow step that launched kernels one
    by one, not a graph, ran eagerly."""
    ranges, engine_tid = _engine_ranges(events)
    if engine_tid is None:
        return {"error": NO_STEPS}
    starts = sorted(float(e["ts"]) for e in ranges if e["tid"] == engine_tid and e["name"] == STEP_RANGE)
    busy = _BusyTime([(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in events
                      if e.get("ph") == "X" and e.get("cat") in _GPU_CATEGORIES])
    launches = sorted((float(e["ts"]), "graph" if "GraphLaunch" in e["name"] else "kernel") for e in events
                      if e.get("ph") == "X" and e.get("cat") in _LAUNCH_CATEGORIES and e.get("tid") == engine_tid
                      and ("LaunchKernel" in e["name"] or "GraphLaunch" in e["name"]))
    engine_ranges = sorted((float(e["ts"]), e["name"], float(e.get("dur", 0.0))) for e in ranges
                           if e["tid"] == engine_tid and e["name"] != STEP_RANGE)
    kernels = sorted((float(e["ts"]), kernel_kind(str(e.get("name", ""))), float(e.get("dur", 0.0))) for e in events
                     if e.get("ph") == "X" and e.get("cat") == "kernel")
    steps = []
    for start, end in zip(starts, starts[1:]):
        kinds = Counter(kind for _, kind in _starting_within(launches, start, end))
        inside: dict[str, float] = defaultdict(float)
        for _, name, dur in _starting_within(engine_ranges, start, end):
            inside[name] += dur / 1e3
        by_kind: dict[str, float] = defaultdict(float)
        for _, kind, dur in _starting_within(kernels, start, end):
            by_kind[kind] += dur / 1e3
        steps.append({"start_ms": (start - starts[0]) / 1e3, "wall_ms": (end - start) / 1e3,
                      "gpu_busy_ms": busy.within(start, end) / 1e3, "graph_launches": kinds["graph"],
                      "kernel_launches": kinds["kernel"],
                      "ranges_ms": dict(sorted(inside.items(), key=lambda item: -item[1])[:5]),
                      "kernels_ms": dict(sorted(by_kind.items(), key=lambda item: -item[1]))})
    if not steps:
        return {"error": "one step only: no window to measure"}
    walls = sorted(step["wall_ms"] for step in steps)

    def percentile(q: float) -> float:
        return walls[min(len(walls) - 1, int(q * len(walls)))]

    return {"num_steps": len(steps), "wall_ms": {"p50": percentile(0.5), "p90": percentile(0.9),
                                                 "p99": percentile(0.99), "max": walls[-1]},
            "eager_steps": sum(1 for step in steps if step["kernel_launches"] > 8 * (step["graph_launches"] + 1)),
            "slowest": sorted(steps, key=lambda step: -step["wall_ms"])[:top]}


def _starting_within(rows: list[tuple], start: float, end: float) -> list[tuple]:
    """The rows (sorted, each starting with its time) that start in [start, end)."""
    return rows[bisect_left(rows, (start,)):bisect_left(rows, (end,))]


def format_step_windows(windows: dict, title: str) -> str:
    if "error" in windows:
        return f"{title}: {windows['error']}"
    wall = windows["wall_ms"]
    lines = [f"{title}: {windows['num_steps']} steps, wall ms p50 {wall['p50']:.2f} p90 {wall['p90']:.2f} "
             f"p99 {wall['p99']:.2f} max {wall['max']:.2f}; {windows['eager_steps']} launched kernel by kernel"]
    for step in windows["slowest"]:
        lines.append(f"  at {step['start_ms']:9.1f} ms: {step['wall_ms']:7.2f} ms wall, GPU busy "
                     f"{step['gpu_busy_ms']:7.2f}, {step['graph_launches']} graphs + {step['kernel_launches']} "
                     "kernels; " + ", ".join(f"{name} {ms:.2f}" for name, ms in step["ranges_ms"].items())
                     + "; GPU: " + ", ".join(f"{kind} {ms:.2f}" for kind, ms in step["kernels_ms"].items()))
    return "\n".join(lines)
