"""For router tests: `serval route` as a real process, backends started in parallel, and a scriptable backend.

The scriptable backend is a tiny OpenAI-compatible streaming server on loopback whose behaviour a test sets
(answer, fail with a status, break a stream after its first chunk): what a real engine cannot be made to do
on command. Everything else in the router tests is a real `serval serve`.
"""
from __future__ import annotations

import asyncio
import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import yaml

from tests.e2e.server import (REPO_ROOT, RemoteServer, free_port, metric_sum, stop_process, tiny_model_dir,
                        wait_for_health)


@functools.cache
def other_model_dir() -> str:
    """A second tiny model (other weights, longer context) with the same tokenizer as tiny_model_dir()."""
    import torch
    import transformers

    source = tiny_model_dir()
    path = tempfile.mkdtemp(prefix="serval-tiny-other-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    for name in os.listdir(source):
        if "token" in name or name.endswith(".jinja") or name == "special_tokens_map.json":
            shutil.copy(os.path.join(source, name), path)
    config = transformers.LlamaConfig.from_pretrained(source)
    config.num_hidden_layers, config.max_position_embeddings = 3, 2048
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def start_servers(arg_lists: list[list[str]]) -> list[RemoteServer]:
    """Start several `serval serve` processes at once (each takes seconds to load)."""
    with ThreadPoolExecutor(len(arg_lists)) as pool:
        return list(pool.map(RemoteServer, arg_lists))


class RouterProcess:
    """`python -m serval.cli route --config FILE` on a free loopback port, ready when /health answers."""

    def __init__(self, config: dict, extra_args: list[str] | None = None, timeout: float = 60.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_file = tempfile.NamedTemporaryFile("w", prefix="router-", suffix=".yaml", delete=False)
        yaml.safe_dump(config, self.config_file)
        self.config_file.close()
        self.log_file = tempfile.NamedTemporaryFile(prefix="serval-route-", suffix=".log", delete=False)
        command = [sys.executable, "-m", "serval.cli", "route", "--config", self.config_file.name,
                   "--host", "127.0.0.1", "--port", str(self.port), *(extra_args or [])]
        self.process = subprocess.Popen(command, stdout=self.log_file, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        try:  # /health answers 503 while no backend is healthy: any answer means it is up
            wait_for_health(self.process, self.url, timeout, "serval route", self.log_text, needs_ok=False)
        except TimeoutError:
            self.close()
            raise

    def log_text(self) -> str:
        with open(self.log_file.name, errors="replace") as handle:
            return handle.read()

    def metric(self, name: str, **labels) -> float:
        return metric_sum(self.url, name, **labels)

    def close(self) -> None:
        stop_process(self.process, self.log_file, timeout=10)
        os.unlink(self.config_file.name)


class ScriptedBackend:
    """An OpenAI-compatible backend on a loopback port, run in a thread; `mode` says how it answers:
    "ok" (streams or answers `tokens` words), "status:N" (HTTP N with an OpenAI error body),
    "break" (a stream that dies after its first chunk), "hold" (streams wait after their first chunk),
    "down" (/health and /v1/models answer 503)."""

    def __init__(self, model: str = "stub", tokens: int = 3) -> None:
        self.model, self.tokens, self.mode = model, tokens, "ok"
        self.requests: list[dict] = []
        self.release: asyncio.Event | None = None
        self.metrics_text = ""  # served at /metrics
        self.chunks: list[str] | None = None  # the streamed texts (default: " tok0", " tok1", ...)
        self.error_type = "x"  # the error body's type in "status:N" mode
        self.retry_after: str | None = None  # Retry-After in "status:N" mode
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.release = asyncio.Event()
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        ready.set()
        self.loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                method, path, _ = head[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip()
                           for k, _, v in (line.partition(":") for line in head[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                if not await self._route(method, path, body, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _route(self, method: str, path: str, body: bytes, writer) -> bool:
        """Answer one request; False closes the connection."""
        if path == "/health":
            return await _respond(writer, 503 if self.mode == "down" else 200, {})
        if path == "/metrics":
            body = self.metrics_text.encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            await writer.drain()
            return True
        if path == "/v1/models":
            if self.mode == "down":
                return await _respond(writer, 503, {})
            return await _respond(writer, 200, {"object": "list", "data": [{"id": self.model, "max_model_len": 64}]})
        request = json.loads(body or b"{}")
        self.requests.append(request)
        if self.mode.startswith("status:"):
            status = int(self.mode.split(":")[1])
            headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
            return await _respond(writer, status, {"error": {"message": f"scripted {status}", "type": self.error_type,
                                                             "param": None, "code": None}}, headers)
        chat = path.endswith("chat/completions")
        if not request.get("stream"):
            text = "".join(self.chunks) if self.chunks else " tok" * self.tokens
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                      else {"index": 0, "text": text})
            return await _respond(writer, 200, {"id": "s", "model": request.get("model"), "choices": [choice]})
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        texts = self.chunks or [f" tok{index}" for index in range(self.tokens)]
        for index, piece in enumerate(texts):
            finish = "length" if index == len(texts) - 1 else None
            choice = {"index": 0, "delta": {"content": piece}, "finish_reason": finish} if chat else \
                {"index": 0, "text": piece, "finish_reason": finish}
            await _chunk(writer, b"data: " + json.dumps({"id": "s", "choices": [choice]}).encode() + b"\n\n")
            if (request.get("stream_options") or {}).get("include_usage") and index == len(texts) - 1:
                usage = {"prompt_tokens": 5, "completion_tokens": len(texts), "total_tokens": 5 + len(texts)}
                await _chunk(writer, b"data: " + json.dumps({"id": "s", "choices": [], "usage": usage}).encode()
                             + b"\n\n")
            if self.mode == "hold" and index == 0:
                await self.release.wait()  # the test reads the first chunk through the router, then releases
            if self.mode == "break":
                await asyncio.sleep(0.05)  # let the first chunk reach the router before the connection dies
                writer.transport.abort()
                return False
        await _chunk(writer, b"data: [DONE]\n\n")
        if self.mode == "linger":
            await self.release.wait()  # the client has its whole answer; the response has not ended yet
        await _chunk(writer, b"")
        return True

    def hold(self, mode: str = "hold") -> None:
        """Streams stop after their first chunk ("hold") or after [DONE] ("linger") until release_held()."""
        self.loop.call_soon_threadsafe(self.release.clear)
        self.mode = mode

    def release_held(self) -> None:
        self.loop.call_soon_threadsafe(self.release.set)

    def close(self) -> None:
        async def shut_down() -> None:  # connections still open (keep-alive, held streams) end before the loop
            self.server.close()
            self.release.set()
            handlers = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shut_down(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.loop.is_running():
            self.loop.close()


async def _chunk(writer, data: bytes) -> None:
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
    await writer.drain()


async def _respond(writer, status: int, payload: dict, headers: dict | None = None) -> bool:
    body = json.dumps(payload).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items()).encode()
    writer.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
                 % (status, extra, len(body), body))
    await writer.drain()
    return True
