"""`serval chat` and `serval complete`: a terminal conversation (or prompt completion) with a running server, or,
with --offline or no server at --url, with an engine in this process; tokens are written as they come.

Lines typed are turns; `/reset` forgets the conversation, `/exit` (or end of input) leaves. What the model says
is this command's output, so it goes to stdout; logs stay on stderr.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

import httpx

DEFAULT_URL = "http://localhost:8000/v1"
PROMPT = "> "
EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"
# How long to wait for the server's /models before falling back to the offline engine.
CONNECT_TIMEOUT_S = 3.0

Write = Callable[[str], None]


@dataclass
class ChatSettings:
    """What `serval chat` / `serval complete` was asked for; None leaves a sampling field to the server."""
    url: str = DEFAULT_URL
    model: str | None = None
    api_key: str | None = None
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    offline: bool = False

    def sampling_fields(self) -> dict:
        fields = {"max_tokens": self.max_tokens, "temperature": self.temperature}
        return {name: value for name, value in fields.items() if value is not None}


class ServerBackend:
    """A running OpenAI-compatible server, streamed over SSE."""

    def __init__(self, settings: ChatSettings, model: str) -> None:
        self.settings, self.model = settings, model
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self.client = httpx.Client(base_url=settings.url.rstrip("/"), headers=headers, timeout=None)

    def chat(self, messages: list[dict], write: Write) -> str:
        body = {"model": self.model, "messages": messages, "stream": True, **self.settings.sampling_fields()}
        return self._stream("/chat/completions", body, lambda choice: choice["delta"].get("content"), write)

    def complete(self, prompt: str, write: Write) -> str:
        body = {"model": self.model, "prompt": prompt, "stream": True, **self.settings.sampling_fields()}
        return self._stream("/completions", body, lambda choice: choice.get("text"), write)

    def _stream(self, path: str, body: dict, piece_of, write: Write) -> str:
        pieces = []
        with self.client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                response.read()
                raise RuntimeError(f"the server answered {response.status_code}: {response.text[:500]}")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    raise RuntimeError(event["error"].get("message", "error"))
                for choice in event.get("choices", []):
                    piece = piece_of(choice)
                    if piece:
                        pieces.append(piece)
                        write(piece)
        return "".join(pieces)

    def close(self) -> None:
        self.client.close()


class OfflineBackend:
    """An engine in this process (serval.AsyncEngine), for when no server runs."""

    def __init__(self, settings: ChatSettings, engine_config) -> None:
        from serval.engine.async_engine import AsyncEngine
        self.settings = settings
        self.engine = AsyncEngine(engine_config)
        self.loop = asyncio.new_event_loop()
        self.ids = itertools.count()

    def chat(self, messages: list[dict], write: Write) -> str:
        tokenizer = self.engine.tokenizer
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template already holds BOS where the model wants it.
        prompt = {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}
        return self.loop.run_until_complete(self._stream(prompt, write))

    def complete(self, prompt: str, write: Write) -> str:
        return self.loop.run_until_complete(self._stream(prompt, write))

    async def _stream(self, prompt, write: Write) -> str:
        from serval.sampling_params import SamplingParams
        params = SamplingParams(**{"max_tokens": None, **self.settings.sampling_fields()})
        text = ""
        async for output in self.engine.generate(prompt, params, request_id=f"chat-{next(self.ids)}"):
            new = output.outputs[0].text
            write(new[len(text):])
            text = new
        return text

    def close(self) -> None:
        self.engine.shutdown()
        self.loop.close()


def server_model(settings: ChatSettings) -> str | None:
    """The model to ask for: --model, else the server's first; None when no server answers at --url."""
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    try:
        response = httpx.get(settings.url.rstrip("/") + "/models", headers=headers, timeout=CONNECT_TIMEOUT_S)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        raise RuntimeError(f"{settings.url}/models answered {response.status_code}: {response.text[:300]}")
    return settings.model or response.json()["data"][0]["id"]


def run(mode: str, settings: ChatSettings, engine_config, read_line: Callable[[], str] = input,
        write: Write | None = None) -> int:
    """The conversation loop of `serval chat` (mode "chat") or `serval complete` (mode "complete")."""
    write = write or _write_stdout
    backend = _open_backend(settings, engine_config, write)
    messages = [{"role": "system", "content": settings.system}] if settings.system else []
    history = list(messages)
    try:
        while True:
            try:
                line = read_line()
            except (EOFError, KeyboardInterrupt):
                write("\n")
                return 0
            command = line.strip()
            if command in EXIT_COMMANDS:
                return 0
            if command == RESET_COMMAND:
                history = list(messages)
                write("(conversation reset)\n")
                continue
            if not command:
                continue
            try:
                if mode == "chat":
                    history.append({"role": "user", "content": line})
                    history.append({"role": "assistant", "content": backend.chat(history, write)})
                else:
                    backend.complete(line, write)
            except (httpx.HTTPError, RuntimeError, ValueError) as error:
                if mode == "chat":
                    history.pop()
                write(f"\n(error: {error})")
            write("\n")
    finally:
        backend.close()


def _open_backend(settings: ChatSettings, engine_config, write: Write):
    if not settings.offline:
        model = server_model(settings)
        if model is not None:
            write(f"Chatting with {model!r} at {settings.url}. /reset starts over, /exit leaves.\n")
            return ServerBackend(settings, model)
        write(f"No server at {settings.url}; loading the model here (--offline) ...\n")
    backend = OfflineBackend(settings, engine_config)
    write("Ready (offline engine). /reset starts over, /exit leaves.\n")
    return backend


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def prompt_reader(prompt: str = PROMPT) -> Callable[[], str]:
    return lambda: input(prompt)
