"""A trivial OpenAI-compatible streaming server that emits tokens at scripted times.

For checking the load generator's arithmetic and measuring what one client process sustains: no model, so
the client, not the server, is what gets measured. Plain asyncio (HTTP/1.1 keep-alive, chunked SSE) so it
costs little CPU per request.

    python -m serval.bench.stub_server --port 8123 --ttft-ms 50 --itl-ms 10

Each request streams max_tokens tokens (the word "tok"): the first after ttft_ms, then one chunk every itl_ms
(tokens_per_chunk tokens per chunk). Usage counts prompt words split on whitespace. --fail-every N answers
every Nth request with HTTP 500; a model other than --model (when given) gets 404, as OpenAI does.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import subprocess
import sys
import time

logger = logging.getLogger(__name__)


class StubServer:
    def __init__(self, model: str | None = None, ttft_ms: float = 0.0, itl_ms: float = 0.0,
                 tokens_per_chunk: int = 1, fail_every: int = 0, usage: bool = True) -> None:
        self.model, self.ttft, self.itl = model, ttft_ms / 1000.0, itl_ms / 1000.0
        self.tokens_per_chunk, self.fail_every, self.usage = tokens_per_chunk, fail_every, usage
        self.counter = itertools.count(1)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                await self.route(method, path, body, writer)
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def route(self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> None:
        if method == "GET" and path == "/v1/models":
            return await respond(writer, 200, {"object": "list", "data": [{"id": self.model or "stub", "object": "model"}]})
        if method != "POST" or path not in ("/v1/completions", "/v1/chat/completions"):
            return await respond(writer, 404, {"error": {"message": f"no route {method} {path}"}})
        request = json.loads(body or b"{}")
        if self.model is not None and request.get("model") != self.model:
            return await respond(writer, 404, {"error": {"message": f"model {request.get('model')!r} not found",
                                                         "type": "NotFoundError"}})
        if self.fail_every and next(self.counter) % self.fail_every == 0:
            return await respond(writer, 500, {"error": {"message": "scripted failure"}})
        await self.stream(path.endswith("chat/completions"), request, writer)

    async def stream(self, chat: bool, request: dict, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        max_tokens = int(request.get("max_tokens") or request.get("max_completion_tokens") or 16)
        prompt = " ".join(m.get("content", "") for m in request["messages"]) if chat else request.get("prompt", "")
        kind = "chat.completion.chunk" if chat else "text_completion"
        start, sent = time.perf_counter(), 0
        while sent < max_tokens:
            count = min(self.tokens_per_chunk, max_tokens - sent)
            due = start + self.ttft + (self.itl * (sent // self.tokens_per_chunk) if sent else 0.0)
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            text = " tok" * count
            sent += count
            finish = "length" if sent == max_tokens else None
            choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish} if chat else \
                {"index": 0, "text": text, "finish_reason": finish}
            await send_event(writer, {"id": "stub", "object": kind, "model": request.get("model"), "choices": [choice]})
        if self.usage and (request.get("stream_options") or {}).get("include_usage"):
            prompt_tokens = len(str(prompt).split())
            await send_event(writer, {"id": "stub", "object": kind, "choices": [], "usage": {
                "prompt_tokens": prompt_tokens, "completion_tokens": max_tokens, "total_tokens": prompt_tokens + max_tokens}})
        await send_chunk(writer, b"data: [DONE]\n\n")
        await send_chunk(writer, b"")


async def send_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
    await writer.drain()


async def send_event(writer: asyncio.StreamWriter, payload: dict) -> None:
    await send_chunk(writer, b"data: " + json.dumps(payload).encode() + b"\n\n")


async def respond(writer: asyncio.StreamWriter, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    writer.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (status, len(body), body))
    await writer.drain()


async def serve(server: StubServer, host: str, port: int) -> None:
    listener = await asyncio.start_server(server.handle, host, port, backlog=4096)
    logger.info("stub server listening", extra={"host": host, "port": port})
    print(f"listening on {host}:{listener.sockets[0].getsockname()[1]}", flush=True)  # readiness line for parents
    async with listener:
        await listener.serve_forever()


@contextlib.contextmanager
def stub_process(*args: str, timeout: float = 20.0):
    """Runs the stub in a subprocess on 127.0.0.1 and a free port; yields its base URL; stops it on exit."""
    process = subprocess.Popen([sys.executable, "-m", "serval.bench.stub_server", "--port", "0", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + timeout
        line = process.stdout.readline()  # blocks until the readiness line (or the process dies: "")
        if not line.startswith("listening on") or time.monotonic() > deadline:
            raise RuntimeError(f"stub server did not start: {line!r}")
        yield "http://" + line.split()[-1]
    finally:
        process.terminate()
        process.wait(timeout=10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--model", default=None)
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--itl-ms", type=float, default=0.0)
    parser.add_argument("--tokens-per-chunk", type=int, default=1)
    parser.add_argument("--fail-every", type=int, default=0)
    parser.add_argument("--no-usage", action="store_true")
    args = parser.parse_args(argv)
    stub = StubServer(args.model, args.ttft_ms, args.itl_ms, args.tokens_per_chunk, args.fail_every, not args.no_usage)
    try:
        asyncio.run(serve(stub, args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
