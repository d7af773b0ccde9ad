"""The GIL time one decode step's outputs cost with --engine-process on (issue 15): B streamed requests, each
128-256 tokens in, on the CPU of this machine, with the real OutputProcessor, Request objects and tokenizer
(SmolLM2's) and no model: each step appends one token of a realistic answer (prose and a JSON tool call) to
every request, as a decode step of B rows would.

Three parts of a step, each timed on its own (time.perf_counter; median over the measured steps):
    engine   the engine thread builds what the core sends (OutputProcessor.make_deltas, after process_step, as
             LLMEngine._finish calls it)
    output   the core's output thread pickles the step's message (core_messages.dumps)
    api      the API process's reader unpickles it and rebuilds the cumulative RequestOutputs (OutputDecoder)
process_step (detokenizing, stop checks) is timed too, for scale: the change leaves it alone.

    python benchmarks/core_output_bench.py --out core_output_cpu.json
    python benchmarks/core_output_bench.py --logprobs 5 --out core_output_logprobs_cpu.json
    python benchmarks/core_output_bench.py --batch-sizes 8 --steps 4     # checks the script end to end
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serval.engine import core_messages as messages  # noqa: E402
from serval.engine.output_processor import OutputProcessor, SampledToken  # noqa: E402
from serval.engine.request import Request, RequestStatus  # noqa: E402
from serval.model.default_model import default_model_path  # noqa: E402
from serval.model.tokenizer import load_tokenizer  # noqa: E402
from serval.outputs import Logprob  # noqa: E402
from serval.sampling_params import SamplingParams  # noqa: E402

ANSWER = (
    "I'll check the current weather for you. The forecast service needs the city and the unit, so I'm calling it "
    "with the location you gave and Celsius, which is what you asked for last time.\n"
    '{"name": "get_current_weather", "arguments": {"location": "San Francisco, CA", "unit": "celsius", '
    '"days": 3, "include_hourly": false, "fields": ["temperature", "precipitation", "wind_speed"]}}\n'
    "While that runs: San Francisco is usually mild in spring, with morning fog near the coast that clears by "
    "noon, highs around 17 degrees and a steady westerly breeze in the afternoon. ")
PROMPT = ("You are a helpful assistant with access to tools. Answer the user's question, calling a tool when it "
          "needs live data. " * 8)


@dataclass
class Row:
    batch: int
    logprobs: int | None  # top logprobs each request asked for
    num_steps: int
    tokens_before: int  # each request's output tokens when the first measured step starts
    engine_ms: float
    output_ms: float
    api_ms: float
    process_step_ms: float
    message_bytes: int


def answer_token_ids(tokenizer, length: int) -> list[int]:
    token_ids = tokenizer.encode(ANSWER, add_special_tokens=False)
    return (token_ids * (length // len(token_ids) + 2))[:length + 64]


def start_requests(processor: OutputProcessor, prompt_token_ids: list[int], batch: int, max_tokens: int,
                   logprobs: int | None):
    requests = []
    for i in range(batch):
        request_id = f"chatcmpl-{i:04d}"
        params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=logprobs)
        request = Request(request_id, prompt_token_ids, params, eos_token_id=None, max_model_len=4096,
                          prompt=PROMPT, parent_request_id=request_id)
        request.status = RequestStatus.RUNNING
        request.first_scheduled_time = request.num_cached_tokens = 0
        processor.add_request(processor.new_request_state(request_id, PROMPT, prompt_token_ids, [request]))
        requests.append(request)
    return requests


def sampled_logprobs(token_id: int, logprobs: int | None) -> dict[int, Logprob] | None:
    """The chosen token and the top `logprobs` others, as the sampler reports them."""
    if logprobs is None:
        return None
    entries = {token_id: Logprob(-0.25, 1)}
    for rank in range(logprobs):
        entries.setdefault(1000 + 37 * rank, Logprob(-1.5 - rank, rank + 2))
    return entries


def measure(tokenizer, batch: int, logprobs: int | None, warm_steps: int, num_steps: int) -> Row:
    processor = OutputProcessor(tokenizer)
    prompt_token_ids = tokenizer.encode(PROMPT)
    answer = answer_token_ids(tokenizer, warm_steps + num_steps)
    requests = start_requests(processor, prompt_token_ids, batch, warm_steps + num_steps + 16, logprobs)
    decoder = messages.OutputDecoder()
    times: dict[str, list[float]] = {"engine": [], "output": [], "api": [], "process_step": []}
    size = 0
    for step in range(warm_steps + num_steps):
        # Each request at its own place in the answer, so their texts differ as a batch's do.
        token_ids = [answer[(step + i) % len(answer)] for i in range(batch)]
        sampled = [SampledToken(token_id, sampled_logprobs(token_id, logprobs), None) for token_id in token_ids]
        started = time.perf_counter()
        update = processor.process_step(requests, sampled, time.monotonic())
        processed = time.perf_counter()
        deltas = processor.make_deltas(update.to_report)
        built = time.perf_counter()
        data = messages.dumps([messages.StepMessage(deltas, [], None, batch)])
        sent = time.perf_counter()
        received = [decoder.decode(delta) for delta in messages.loads(data)[0].outputs]
        decoded = time.perf_counter()
        assert len(received) == batch
        if step >= warm_steps:
            for name, seconds in (("process_step", processed - started), ("engine", built - processed),
                                  ("output", sent - built), ("api", decoded - sent)):
                times[name].append(seconds * 1e3)
            size = len(data)
    return Row(batch, logprobs, num_steps, warm_steps, *(statistics.median(times[name]) for name in
                                              ("engine", "output", "api", "process_step")), size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--logprobs", type=int, help="each request asks for this many top logprobs")
    parser.add_argument("--warm-steps", type=int, default=128, help="output tokens each request has before timing")
    parser.add_argument("--steps", type=int, default=128, help="steps timed")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    tokenizer = load_tokenizer(default_model_path())
    rows = [measure(tokenizer, batch, args.logprobs, args.warm_steps, args.steps) for batch in args.batch_sizes]
    print(f"{'B':>5} {'engine ms':>10} {'output ms':>10} {'core total':>11} {'api ms':>8} {'process_step':>13} "
          f"{'bytes':>8}")
    for row in rows:
        print(f"{row.batch:>5} {row.engine_ms:>10.3f} {row.output_ms:>10.3f} {row.engine_ms + row.output_ms:>11.3f} "
              f"{row.api_ms:>8.3f} {row.process_step_ms:>13.3f} {row.message_bytes:>8}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
                       "rows": [asdict(row) for row in rows]}, f, indent=2)


if __name__ == "__main__":
    main()
