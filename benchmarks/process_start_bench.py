"""How long serval's processes take to start: from the fork server (the default) against fresh `spawn`
interpreters (SERVAL_WORKER_MULTIPROC_METHOD=spawn). Each run is a fresh driver process that starts, one after the
other, --starts tensor-parallel engines (`LLM(tensor_parallel_size=--tp)`: its workers) and --starts engine-core
processes (EngineCoreClient, the engine in its own process as `serve --engine-process` runs it), on a tiny random
Llama; a start's seconds run from the constructor's call to its return (workers joined and loaded; core ready).
The first start of a driver includes the fork server's own start (its imports); later ones are forks.

Runs alternate between the methods so that other work on a shared machine hits them alike; the table shows, per
method and kind, the first start and the median of the later ones, over --repeats drivers.

    python benchmarks/process_start_bench.py --output docs/results/process_start_cpu.json
    python benchmarks/process_start_bench.py --device cuda --tp 2 --output docs/results/process_start_h200.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("spawn", "forkserver")


def driver(model: str, device: str, tp: int, starts: int) -> dict[str, list[float]]:
    """One driver process's starts, in seconds."""
    from serval import LLM
    from serval.engine.core_client import EngineCoreClient

    engine_args = dict(model=model, skip_tokenizer_init=True, max_model_len=64, num_gpu_blocks_override=32,
                       block_size=16, device=device, enforce_eager=True)
    times: dict[str, list[float]] = {"tp_engine": [], "engine_core": []}
    for _ in range(starts):
        start = time.perf_counter()
        llm = LLM(tensor_parallel_size=tp, **engine_args)
        times["tp_engine"].append(time.perf_counter() - start)
        llm.shutdown()
    for _ in range(starts):
        start = time.perf_counter()
        client = EngineCoreClient.from_engine_args(**engine_args)
        times["engine_core"].append(time.perf_counter() - start)
        client.shutdown()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output")
    parser.add_argument("--driver", help=argparse.SUPPRESS)  # a model path: run as one driver, print JSON
    args = parser.parse_args()
    if args.driver:
        print(json.dumps(driver(args.driver, args.device, args.tp, args.starts)))
        return
    sys.path.insert(0, REPO_ROOT)
    from tests.conftest import build_tiny_model

    model = tempfile.mkdtemp(prefix="process_start_")
    build_tiny_model(model, "llama")
    runs: dict[str, list[dict[str, list[float]]]] = {method: [] for method in METHODS}
    for _ in range(args.repeats):
        for method in METHODS:
            command = [sys.executable, os.path.abspath(__file__), "--driver", model, "--device", args.device,
                       "--tp", str(args.tp), "--starts", str(args.starts)]
            done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                                  env={**os.environ, "SERVAL_WORKER_MULTIPROC_METHOD": method,
                                       "PYTHONPATH": REPO_ROOT})
            runs[method].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = []
    for kind in ("tp_engine", "engine_core"):
        for method in METHODS:
            first = [run[kind][0] for run in runs[method]]
            later = [t for run in runs[method] for t in run[kind][1:]]
            rows.append({"kind": kind, "method": method, "first_s": statistics.median(first),
                         "later_median_s": statistics.median(later) if later else None})
    print(f"{'kind':<12} {'method':<11} {'first start s':>14} {'later starts s':>15}")
    for row in rows:
        later = "-" if row["later_median_s"] is None else f"{row['later_median_s']:.2f}"
        print(f"{row['kind']:<12} {row['method']:<11} {row['first_s']:>14.2f} {later:>15}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"device": args.device, "tp": args.tp, "starts": args.starts, "repeats": args.repeats,
                       "cpu_count": os.cpu_count(), "rows": rows, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
