"""The hostile-input probe of issue 13, as a script: start `serval serve`, send it the catalogue of malformed and
hostile requests (tests/e2e/test_hardening.py's HOSTILE list), N schema-based fuzz bodies (test_api_fuzz.py's
strategies), a 10 MB body (declared and chunked) while /health is polled, `n=128` while /health is polled, then
SIGTERM during streams; print a table and write JSON.

What it reports: requests sent, status counts, 5xx count, 4xx without OpenAI's error body, catalogue answers other
than the expected status, /health failures and the slowest /health answer while a big body or a wide `n` was in
flight, and the drain after SIGTERM (seconds to exit, exit status, streams that ended with [DONE], whether a new
request got 503).

    python benchmarks/probe.py [--model PATH|default] [--fuzz 200] [--shutdown-timeout 3] \
        [--output docs/results/probe.json]

The default model is the tiny random-weight Llama the end-to-end tests build (SmolLM2's tokenizer); `--model
default` serves SmolLM2-135M-Instruct itself.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import signal
import sys
import threading
import time

import httpx

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from tests.e2e.server import API_KEY, RemoteServer, tiny_model_dir  # noqa: E402
from tests.e2e.test_api_fuzz import ENDPOINTS, raw_bodies  # noqa: E402
from tests.e2e.test_hardening import (AUTH, BODY_LIMIT, JSON, MODEL, HealthWatch, hostile_catalogue,  # noqa: E402
                                      send)

SMOLLM2_VOCAB = 49152


class Tally:
    """Every answer the probe got: status counts, and the answers that break the issue's promises."""

    def __init__(self) -> None:
        self.statuses: collections.Counter = collections.Counter()
        self.server_errors: list[dict] = []
        self.shapeless_errors: list[dict] = []
        self.unexpected: list[dict] = []

    def add(self, name: str, response: httpx.Response | None, expected: int | None = None) -> None:
        status = response.status_code if response is not None else "connection closed"
        self.statuses[status] += 1
        if response is None:
            return
        case = {"case": name, "status": status, "body": response.text[:300]}
        if status >= 500:
            self.server_errors.append(case)
        if status >= 400 and not _openai_error(response):
            self.shapeless_errors.append(case)
        if expected is not None and status != expected:
            self.unexpected.append({**case, "expected": expected})

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())


def _openai_error(response: httpx.Response) -> bool:
    try:
        error = response.json()["error"]
        return isinstance(error["message"], str) and isinstance(error["type"], str) and "param" in error
    except (ValueError, KeyError, TypeError):
        return False


def fuzz_bodies(count: int) -> list[tuple[str, bytes]]:
    """`count` bodies per endpoint from the fuzz test's strategies, the same every run."""
    from hypothesis import HealthCheck, given, settings
    bodies = []
    for path, schema in ENDPOINTS.items():
        @settings(max_examples=count, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(body=raw_bodies(schema))
        def collect(body: bytes) -> None:
            bodies.append((path, body))  # noqa: B023 - collect runs within this iteration
        collect()
    return bodies


def probe_catalogue(server: RemoteServer, vocab: int, tally: Tally) -> None:
    for probe in hostile_catalogue(vocab):
        tally.add(probe.name, send(server.url, probe), probe.status)


def probe_fuzz(server: RemoteServer, count: int, tally: Tally) -> None:
    with httpx.Client(base_url=server.url, timeout=120, headers={**JSON, **AUTH}) as client:
        for path, body in fuzz_bodies(count):
            tally.add(f"fuzz {path}", client.post(path, content=body))


def probe_health_under_load(server: RemoteServer, tally: Tally) -> dict:
    """/health while a 10 MB body (declared, then chunked), a body just under the limit and n=128 are in flight."""
    big = b'{"model": "tiny", "prompt": "' + b"x " * 5_000_000 + b'"}'

    def chunked():
        yield big[:1_000_000]
        for start in range(1_000_000, len(big), 1_000_000):
            yield big[start:start + 1_000_000]

    under_limit = json.dumps({"model": MODEL, "prompt": "lorem ipsum dolor sit amet " * 70_000,
                              "max_tokens": 1}).encode()
    cases = [("10 MB body", "/v1/completions", big, 413), ("10 MB chunked body", "/v1/completions", chunked, 413),
             (f"{len(under_limit) / 1e6:.1f} MB body under the limit", "/v1/completions", under_limit, 400)]
    results = {}
    for name, path, body, expected in cases:
        with HealthWatch(server.url) as watch:
            started = time.monotonic()
            try:
                response = httpx.post(server.url + path, content=body() if callable(body) else body,
                                      headers={**JSON, **AUTH}, timeout=120)
            except httpx.HTTPError:
                response = None  # the server answered 413 and closed before the upload ended
            seconds = time.monotonic() - started
        tally.add(name, response, expected)
        results[name] = _health_result(watch, seconds, response)
    with HealthWatch(server.url) as watch:
        started = time.monotonic()
        response = httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=300, json={
            "model": MODEL, "prompt": "hi", "max_tokens": 2, "n": 128, "ignore_eos": True})
        seconds = time.monotonic() - started
    tally.add("n=128", response, 200)
    results["n=128, 2 tokens each"] = _health_result(watch, seconds, response)
    return results


def _health_result(watch: HealthWatch, seconds: float, response: httpx.Response | None) -> dict:
    return {"status": response.status_code if response is not None else "closed", "request_s": round(seconds, 3),
            "health_polls": len(watch.statuses),
            "health_failures": sum(status != 200 for status in watch.statuses),
            "health_max_latency_s": round(max(watch.latencies, default=0.0), 3)}


def probe_drain(args: argparse.Namespace, model_args: list[str]) -> dict:
    """SIGTERM with streams in flight: seconds to exit, exit status, how the streams ended, the late request's
    status."""
    # A context long enough for the streams, one sequence at a time: the drain has more work than its timeout.
    remote = RemoteServer([*model_args, "--max-model-len", "1024", "--max-num-seqs", "1",
                           "--shutdown-timeout", str(args.shutdown_timeout)])
    streams: list[list] = [[] for _ in range(args.drain_streams)]
    body = {"model": MODEL, "prompt": "drain", "max_tokens": args.drain_tokens, "ignore_eos": True, "stream": True}

    def read(out: list) -> None:
        try:
            with httpx.stream("POST", remote.url + "/v1/completions", json=body, timeout=300) as response:
                out.append(response.status_code)
                out.extend(line[6:] for line in response.iter_lines() if line.startswith("data: "))
        except httpx.HTTPError as error:
            out.append(type(error).__name__)

    threads = [threading.Thread(target=read, args=(out,)) for out in streams]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 120
        while len(streams[0]) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        signalled = time.monotonic()
        remote.process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        try:
            late = httpx.post(remote.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1},
                              timeout=30).status_code
        except httpx.HTTPError as error:
            late = type(error).__name__
        status = remote.process.wait(timeout=args.shutdown_timeout + 120)
        exit_s = time.monotonic() - signalled
        for thread in threads:
            thread.join(timeout=60)
    finally:
        remote.close()
    ended = {"completed": 0, "error event + [DONE]": 0, "cut": 0}
    for events in streams:
        payloads = [json.loads(e) for e in events[1:-1]] if events and events[-1] == "[DONE]" else None
        if payloads is None:
            ended["cut"] += 1
        elif any("error" in p for p in payloads):
            ended["error event + [DONE]"] += 1
        else:
            ended["completed"] += 1
    return {"shutdown_timeout_s": args.shutdown_timeout, "streams": args.drain_streams,
            "tokens_per_stream": args.drain_tokens, "exit_status": status, "sigterm_to_exit_s": round(exit_s, 2),
            "late_request_status": late, "streams_ended": ended}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model path, or 'default' (default: the tests' tiny model)")
    parser.add_argument("--vocab-size", type=int, default=None, help="the model's vocabulary (default: read from "
                                                                      "the tiny model, SmolLM2's for 'default')")
    parser.add_argument("--fuzz", type=int, default=100, help="fuzz bodies per endpoint (4 endpoints)")
    parser.add_argument("--shutdown-timeout", type=float, default=3.0)
    parser.add_argument("--drain-streams", type=int, default=3)
    parser.add_argument("--drain-tokens", type=int, default=900, help="per stream; the drain server's context is "
                                                                       "1024 tokens")
    parser.add_argument("--output", default="docs/results/probe.json")
    args = parser.parse_args()

    if args.model is None:
        model_path = tiny_model_dir()
        with open(os.path.join(model_path, "config.json")) as f:
            vocab = args.vocab_size or json.load(f)["vocab_size"]
        model_args = ["--model", model_path]
    else:
        vocab = args.vocab_size or SMOLLM2_VOCAB
        model_args = [] if args.model == "default" else ["--model", args.model]
    model_args += ["--served-model-name", MODEL]

    tally = Tally()
    started = time.monotonic()
    server = RemoteServer([*model_args, "--max-model-len", "512", "--max-request-body-bytes", str(BODY_LIMIT),
                           "--max-num-seqs", "8"], api_key=API_KEY)
    try:
        probe_catalogue(server, vocab, tally)
        probe_fuzz(server, args.fuzz, tally)
        load = probe_health_under_load(server, tally)
        health_after = httpx.get(server.url + "/health", timeout=30).status_code
        idle_after = server.wait_idle()
        ordinary = httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=60,
                              json={"model": MODEL, "prompt": "hello", "max_tokens": 3}).status_code
    finally:
        server.close()
    drain = probe_drain(args, model_args)

    summary = {
        "command": " ".join([os.path.relpath(sys.argv[0], REPO_ROOT), *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "model": args.model or "tiny random Llama (tests/e2e/server.py)", "vocab_size": vocab,
        "requests_sent": tally.sent, "status_counts": {str(k): v for k, v in sorted(tally.statuses.items(),
                                                                                     key=lambda kv: str(kv[0]))},
        "server_errors_5xx": len(tally.server_errors), "errors_without_openai_body": len(tally.shapeless_errors),
        "catalogue_size": len(hostile_catalogue(vocab)), "catalogue_unexpected": tally.unexpected,
        "examples_5xx": tally.server_errors[:10], "health_under_load": load,
        "after": {"health": health_after, "idle_gauges_zero": idle_after, "ordinary_request": ordinary},
        "drain": drain, "seconds": round(time.monotonic() - started, 1)}

    print(f"\nHostile-input probe: {summary['model']}, {summary['machine']}")
    print(f"requests sent {tally.sent} (catalogue {summary['catalogue_size']}, fuzz {4 * args.fuzz}, load cases 4)")
    print("status counts  " + ", ".join(f"{k}: {v}" for k, v in summary["status_counts"].items()))
    print(f"5xx {summary['server_errors_5xx']}   4xx without OpenAI's body {summary['errors_without_openai_body']}   "
          f"catalogue answers not as expected {len(tally.unexpected)}")
    print(f"{'while in flight':<34}{'status':>8}{'request s':>11}{'/health polls':>15}{'failures':>10}"
          f"{'max /health s':>15}")
    for name, row in load.items():
        print(f"{name:<34}{row['status']!s:>8}{row['request_s']:>11.2f}{row['health_polls']:>15}"
              f"{row['health_failures']:>10}{row['health_max_latency_s']:>15.3f}")
    print(f"after: /health {health_after}, idle gauges 0: {idle_after}, ordinary request {ordinary}")
    print(f"drain: SIGTERM with {drain['streams']} streams x {drain['tokens_per_stream']} tokens, one sequence at a "
          f"time, --shutdown-timeout {drain['shutdown_timeout_s']}: exit {drain['exit_status']} after "
          f"{drain['sigterm_to_exit_s']} s, late request {drain['late_request_status']}, streams "
          + ", ".join(f"{k} {v}" for k, v in drain["streams_ended"].items()))
    for case in tally.unexpected[:10]:
        print(f"  unexpected: {case['case']}: {case['status']} (expected {case['expected']}) {case['body'][:120]}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
