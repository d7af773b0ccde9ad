"""Where a profiled serving run's steps went: `serval serve`'s torch-profiler traces (POST /start_profile,
/stop_profile with SERVAL_TORCH_PROFILER_DIR set; docs/performance.md "Profiling a serving run") read back step by
step: the mean step (serval.bench.traces.summarize_steps), the distribution of step wall times, and the slowest
steps with their GPU time, launches (graph replays or kernel by kernel) and engine ranges.

    python benchmarks/trace_steps.py TRACE.pt.trace.json.gz [...] [--top 10] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serval.bench.traces import (format_step_summary, format_step_windows, load_chrome_trace,  # noqa: E402
                                 step_windows, summarize_steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", nargs="+")
    parser.add_argument("--top", type=int, default=10, help="slowest steps listed")
    parser.add_argument("--json", default=None, help="write the summaries here")
    args = parser.parse_args(argv)
    results = {}
    for path in args.traces:
        events = load_chrome_trace(path)
        name = os.path.basename(path)
        results[name] = {"mean": summarize_steps(events), "windows": step_windows(events, args.top)}
        print(format_step_summary(results[name]["mean"], name))
        print(format_step_windows(results[name]["windows"], name))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
