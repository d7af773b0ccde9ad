"""What `serval serve` tells the person who started it: a line while the model loads, and once the port listens a
banner with the URL, the served model name, the memory it holds, and a `curl` command and a Python snippet that
work against this server as started (with a key placeholder only when a key is required).

This is the command's human output, so it goes to stdout as plain text; the same facts go to the JSON log."""
from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass

FIRST_QUESTION = "What is the capital of France?"
# The key placeholder: the environment variable `--api-key` also reads.
KEY_VARIABLE = "SERVAL_API_KEY"
_MIB = 1024 * 1024


@dataclass
class ResidentMemory:
    """Bytes the server holds; None where the engine doesn't say (e.g. no /proc)."""
    weights_bytes: int | None
    kv_cache_bytes: int | None
    kv_cache_tokens: int
    process_bytes: int | None

    def fields(self) -> dict:
        return {"weights_mib": _mib(self.weights_bytes), "kv_cache_mib": _mib(self.kv_cache_bytes),
                "kv_cache_tokens": self.kv_cache_tokens, "resident_mib": _mib(self.process_bytes)}


@dataclass
class ReadyBanner:
    base_url: str  # ends in /v1
    model_name: str
    needs_key: bool
    memory: ResidentMemory

    def curl_command(self) -> str:
        body = {"model": self.model_name, "messages": [{"role": "user", "content": FIRST_QUESTION}]}
        key = f' -H "Authorization: Bearer ${KEY_VARIABLE}"' if self.needs_key else ""
        return (f"curl {self.base_url}/chat/completions -H 'Content-Type: application/json'{key} "
                f"-d {shlex.quote(json.dumps(body))}")

    def python_snippet(self) -> str:
        # Double-quoted literals (JSON's are Python's too), so that shlex.quote wraps it in plain single quotes.
        key = f'os.environ["{KEY_VARIABLE}"]' if self.needs_key else '"none"'
        imports = "import os; " if self.needs_key else ""
        messages = json.dumps([{"role": "user", "content": FIRST_QUESTION}])
        return (f"{imports}from openai import OpenAI; client = OpenAI(base_url={json.dumps(self.base_url)}, "
                f"api_key={key}); print(client.chat.completions.create(model={json.dumps(self.model_name)}, "
                f"messages={messages}).choices[0].message.content)")

    def text(self) -> str:
        memory = self.memory
        held = [f"weights {_mib(memory.weights_bytes)} MiB" if memory.weights_bytes is not None else None,
                f"KV cache {_mib(memory.kv_cache_bytes)} MiB ({memory.kv_cache_tokens} tokens)"
                if memory.kv_cache_bytes is not None else f"KV cache {memory.kv_cache_tokens} tokens",
                f"resident {_mib(memory.process_bytes)} MiB" if memory.process_bytes is not None else None]
        key_note = [f"  (the server requires a key: set {KEY_VARIABLE} first)"] if self.needs_key else []
        return "\n".join([
            "",
            f"Serval is ready at {self.base_url}, serving model {self.model_name!r}.",
            "Memory: " + ", ".join(part for part in held if part) + ".",
            *key_note,
            "Try it with curl:",
            f"  {self.curl_command()}",
            "or with Python (pip install openai):",
            f"  python -c {shlex.quote(self.python_snippet())}",
            "Stop with Ctrl-C.",
            "", ""])


def base_url(host: str, port: int) -> str:
    """The URL a client on this machine uses: a wildcard bind is reached through localhost."""
    if host in ("", "0.0.0.0", "::"):
        host = "localhost"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/v1"


def resident_memory(engine) -> ResidentMemory:
    """What the engine's weights and KV cache hold, and the process's resident set."""
    stats = engine.get_stats()
    usage = engine.memory_usage()
    weights, kv_bytes = usage.weight_bytes, usage.kv_cache_bytes
    return ResidentMemory(weights, kv_bytes, stats.num_blocks * engine.config.block_size, process_resident_bytes())


def process_resident_bytes() -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def write(text: str) -> None:
    """The command's own output (not a log line): flushed at once, as a pipe would buffer it."""
    sys.stdout.write(text)
    sys.stdout.flush()


def loading_line(model: str) -> str:
    return f"Loading {model} ...\n"


def _mib(value: int | None) -> int | None:
    return None if value is None else round(value / _MIB)
