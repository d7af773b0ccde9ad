"""The hand-off of one step's plan from the tensor-parallel driver to a worker: the gloo broadcast of a pickle
(dist.broadcast_object_list, what the driver used to do) against the shared-memory ring (serval.distributed.
shm_broadcast, what it does now). Two ranks on the CPU of one host, no model.

Latency of a message = the reader's clock once it holds the unpickled DecodeStep - the writer's before it pickled
it (time.perf_counter: CLOCK_MONOTONIC, one clock for every process of the host). The messages go one at a time (a
barrier between them, outside the timing), so each is a hand-off, not a queue's throughput.

    busy  the next plan follows at once: the worker is waiting in its spin (the steady state of decoding)
    idle  the next plan comes --idle-gap-ms after the previous: past the ring's spin window (SPIN_S), so the worker
          sleeps between looks and sees the plan up to SLEEP_S late (the back-off's cost; gloo blocks in recv)

    python benchmarks/plan_handoff_bench.py --output docs/results/plan_handoff_cpu.json
    python benchmarks/plan_handoff_bench.py --tiny     # a few hundred messages: checks the script end to end
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pickle
import statistics
import sys
import time
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from serval.distributed import group as groups  # noqa: E402
from serval.distributed.shm_broadcast import (ShmBroadcastReader, ShmBroadcastWriter, create_segment,  # noqa: E402
                                              release_segment)
from serval.distributed.steps import DecodeStep  # noqa: E402


@dataclass
class Row:
    transport: str
    pattern: str  # busy | idle
    batch: int
    message_bytes: int
    count: int
    median_us: float
    p99_us: float


def decode_step(batch: int, context: int, block_size: int) -> DecodeStep:
    """A decode step's plan for `batch` requests `context` tokens in (graph replay, ids in the plan)."""
    blocks = -(-context // block_size)
    return DecodeStep(list(range(1000, 1000 + batch)), [context] * batch,
                      [i * blocks * block_size + context for i in range(batch)], [context + 1] * batch,
                      [list(range(i * blocks, (i + 1) * blocks)) for i in range(batch)], graph_batch=batch)


def run_rank(rank: int, store: dist.TCPStore, segment, spec, plan: list[tuple[str, str, int, int]], args,
             results) -> None:
    """Both ranks run this: rank 0 (this process, as the engine) writes, rank 1 (spawned) reads and reports each
    latency."""
    torch.set_num_threads(1)
    parallel = groups.init_groups(store, rank, 2, torch.device("cpu"))
    control = parallel.control_group
    if rank == 0:
        writer = ShmBroadcastWriter(segment, spec, control, lambda: None, 60.0)
    else:
        reader = ShmBroadcastReader(spec, 0, control)
    for transport, pattern, batch, count in plan:
        step = decode_step(batch, args.context, args.block_size)
        latencies = []
        for _ in range(count + args.warmup):
            dist.barrier(group=control)
            if pattern == "idle":
                time.sleep(args.idle_gap_ms / 1000)  # the reader has been waiting this long
            if rank == 0:
                message = (time.perf_counter(), step)
                if transport == "shm":
                    writer.write(message)
                else:
                    dist.broadcast_object_list([message], src=0, group=control)
            else:
                if transport == "shm":
                    sent_at, _ = reader.read()
                else:
                    box = [None]
                    dist.broadcast_object_list(box, src=0, group=control)
                    sent_at, _ = box[0]
                latencies.append(time.perf_counter() - sent_at)
        if rank == 1:
            results.put((transport, pattern, batch, latencies[args.warmup:]))
    dist.barrier(group=control)
    groups.destroy_groups()


def run_reader(port: int, spec, plan, args, results) -> None:
    run_rank(1, groups.open_store(1, 2, port), None, spec, plan, args, results)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000, help="busy messages per transport and batch")
    parser.add_argument("--idle-messages", type=int, default=200)
    parser.add_argument("--idle-gap-ms", type=float, default=50.0)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--context", type=int, default=1024, help="tokens per request (its block table's length)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--tiny", action="store_true", help="few messages: check the script end to end")
    parser.add_argument("--output", help="write the rows as JSON here")
    args = parser.parse_args()
    if args.tiny:
        args.messages, args.idle_messages, args.warmup, args.batches = 100, 10, 5, [1]
    plan = [(transport, "busy", batch, args.messages) for batch in args.batches for transport in ("gloo", "shm")]
    plan += [(transport, "idle", args.batches[0], args.idle_messages) for transport in ("gloo", "shm")]
    segment, spec = create_segment(num_readers=1)
    store = groups.open_store(0, 2)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    reader = context.Process(target=run_reader, args=(store.port, spec, plan, args, results))
    try:
        reader.start()
        run_rank(0, store, segment, spec, plan, args, results)
        rows = []
        for _ in plan:
            transport, pattern, batch, latencies = results.get(timeout=600)
            size = len(pickle.dumps((0.0, decode_step(batch, args.context, args.block_size))))
            rows.append(Row(transport, pattern, batch, size, len(latencies),
                            round(statistics.median(latencies) * 1e6, 1), round(percentile(latencies, 0.99) * 1e6, 1)))
        reader.join(timeout=60)
    finally:
        if reader.is_alive():
            reader.kill()
        release_segment(segment)
    header = f"{'transport':<10}{'pattern':<8}{'batch':>6}{'bytes':>8}{'count':>7}{'median us':>11}{'p99 us':>10}"
    lines = [header] + [f"{r.transport:<10}{r.pattern:<8}{r.batch:>6}{r.message_bytes:>8}{r.count:>7}"
                        f"{r.median_us:>11.1f}{r.p99_us:>10.1f}" for r in rows]
    sys.stdout.write("\n".join(lines) + "\n")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"rows": [asdict(r) for r in rows], "args": vars(args), "cpus": os.cpu_count()}, f, indent=1)


if __name__ == "__main__":
    main()
