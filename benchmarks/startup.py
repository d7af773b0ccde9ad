"""Start-up of `serval serve` with the default model: seconds from the command to /health 200, to the ready
banner, and to the first token of the first request (streamed chat, from the command's start); resident memory
after that request; seconds from SIGINT to the process's exit when idle. Next to llama-cpp-python's server
(`python -m llama_cpp.server`) on the same GGUF when that package is installed (it answers /v1/models when ready).

Runs alternate between the servers so that other work on a shared machine hits them alike; the table shows the
median over --repeats.

    python benchmarks/startup.py [--repeats 3] [--output results/startup.json] [-- extra serve flags]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import httpx

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "What is the capital of France?"
POLL_S = 0.05


@dataclass
class StartupRun:
    server: str
    healthy_s: float
    first_token_s: float
    resident_mib: float
    exit_after_sigint_s: float
    answer: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resident_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(name: str, command: list[str], port: int, ready_path: str, model: str | None) -> StartupRun:
    log = tempfile.TemporaryFile()
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{name} exited:\n{log.read().decode(errors='replace')[-3000:]}")
            try:
                if httpx.get(url + ready_path, timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(POLL_S)
        healthy = time.monotonic() - started
        body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 16, "stream": True}
        if model is not None:
            body["model"] = model
        first_token, pieces = None, []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choices = json.loads(line[len("data: "):]).get("choices") or [{}]
                content = choices[0].get("delta", {}).get("content")
                if content:
                    first_token = first_token or time.monotonic() - started
                    pieces.append(content)
        memory = resident_mib(process.pid)
        stopping = time.monotonic()
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
        return StartupRun(name, round(healthy, 2), round(first_token or float("nan"), 2), round(memory),
                          round(time.monotonic() - stopping, 2), "".join(pieces))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def serval_command(port: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "serval.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *extra]


def llama_cpp_command(port: int) -> list[str]:
    from serval.model.default_model import default_model_path
    return [sys.executable, "-m", "llama_cpp.server", "--model", default_model_path(), "--host", "127.0.0.1",
            "--port", str(port)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="results/startup.json")
    parser.add_argument("serve_args", nargs="*", help="extra `serval serve` flags (after --)")
    args = parser.parse_args()
    with_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    runs: list[StartupRun] = []
    for _ in range(args.repeats):
        port = free_port()
        runs.append(measure("serval", serval_command(port, args.serve_args), port, "/health", None))
        if with_llama_cpp:
            port = free_port()
            runs.append(measure("llama.cpp", llama_cpp_command(port), port, "/v1/models", None))
    names = ["serval"] + (["llama.cpp"] if with_llama_cpp else [])
    summary = {}
    print(f"{'server':<10} {'healthy s':>10} {'first token s':>14} {'resident MiB':>13} {'exit s':>7}")
    for name in names:
        mine = [run for run in runs if run.server == name]
        row = {field: statistics.median(getattr(run, field) for run in mine)
               for field in ("healthy_s", "first_token_s", "resident_mib", "exit_after_sigint_s")}
        summary[name] = row
        print(f"{name:<10} {row['healthy_s']:>10.2f} {row['first_token_s']:>14.2f} {row['resident_mib']:>13.0f} "
              f"{row['exit_after_sigint_s']:>7.2f}")
    if not with_llama_cpp:
        print("(llama-cpp-python is not installed: `pip install llama-cpp-python` adds its server to the table)")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as file:
        json.dump({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "serve_args": args.serve_args,
                   "median": summary, "runs": [asdict(run) for run in runs]}, file, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
