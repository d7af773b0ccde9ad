"""The load generator: sends a workload to one endpoint with streaming, on an arrival schedule, and times it.

One asyncio loop and one aiohttp session per run. Arrivals follow vLLM: a gamma process with shape
`burstiness` and mean rate `request_rate` (burstiness 1 is Poisson); infinite rate sends all at once.
`max_concurrency` caps requests in flight; the time a request waits for a slot is counted (metrics.wait).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass

import aiohttp
import numpy as np
from tqdm.auto import tqdm

from serval.bench.endpoints import Endpoint
from serval.bench.metrics import RequestResult
from serval.bench.tokenizer import BenchTokenizer
from serval.bench.tools import ToolOptions
from serval.bench.workloads import BenchRequest

logger = logging.getLogger(__name__)


@dataclass
class LoadConfig:
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    duration: float | None = None  # seconds of arrivals; the workload is cycled until then
    num_warmups: int = 0
    timeout: float = 600.0  # per request
    ignore_eos: bool = True  # vLLM/SGLang extension so outputs have the asked length; off for strict OpenAI servers
    seed: int = 0
    progress: bool = True
    tools: ToolOptions | None = None  # chat: the tools and tool_choice every request carries

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise ValueError(f"invalid --request-rate: {self.request_rate}; allowed: > 0 or inf")
        if self.burstiness <= 0:
            raise ValueError(f"invalid --burstiness: {self.burstiness}; allowed: > 0")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"invalid --max-concurrency: {self.max_concurrency}; allowed: >= 1")
        if self.duration is not None and math.isinf(self.request_rate) and self.max_concurrency is None:
            raise ValueError("invalid arguments: --duration needs a finite --request-rate or --max-concurrency")


def arrival_intervals(rng: np.random.Generator, rate: float, burstiness: float):
    """Endless gaps between arrivals, seconds (vLLM's get_request)."""
    while True:
        yield 0.0 if math.isinf(rate) else float(rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness)))


def build_body(endpoint: Endpoint, request: BenchRequest, history: list[dict], ignore_eos: bool,
               tools: ToolOptions | None = None) -> dict:
    body = {"model": endpoint.model, "max_tokens": request.output_len, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    messages = request.messages or [*([{"role": "system", "content": request.system}] if request.system else []),
                                     *history, {"role": "user", "content": request.user}]
    if endpoint.api == "chat":
        body["messages"] = messages
        if tools is not None:
            body.update(tools.body_fields())
    elif request.messages or history:
        body["prompt"] = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"
    else:
        body["prompt"] = f"{request.system}\n\n{request.user}" if request.system else request.user
    body.update(endpoint.extra_body)
    return body


async def stream_request(session: aiohttp.ClientSession, endpoint: Endpoint, body: dict,
                         result: RequestResult, origin: float, timeout: float) -> None:
    """POST with streaming; fills result's times (relative to origin), text, usage or error."""
    headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
    chat = endpoint.api == "chat"
    result.sent = time.perf_counter() - origin
    last = None
    try:
        async with session.post(endpoint.url, json=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            if response.status != 200:
                detail = (await response.text())[:300]
                result.error_type, result.error = f"http_{response.status}", detail
                return
            done = False
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    result.error_type, result.error = "stream_error", str(chunk["error"])[:300]
                    return
                now = time.perf_counter() - origin
                choices = chunk.get("choices") or []
                text, arrived = _chunk_output(choices[0], chat, result) if choices else (None, False)
                if arrived:
                    if result.ttft is None:
                        result.ttft = now - result.sent
                    else:
                        result.itl.append(now - last)
                    last = now
                    result.output_text += text or ""
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                    result.output_tokens = chunk["usage"].get("completion_tokens", 0)
                    result.usage_from_server = True
            if not done:
                result.error_type, result.error = "stream_incomplete", "stream ended without data: [DONE]"
    except asyncio.TimeoutError:
        result.error_type, result.error = "timeout", f"no complete response within {timeout} s"
    except aiohttp.ClientConnectorError as error:
        result.error_type, result.error = "connect", str(error)[:300]
    except (aiohttp.ClientError, json.JSONDecodeError, UnicodeDecodeError) as error:
        result.error_type, result.error = type(error).__name__, str(error)[:300]
    finally:
        result.end = time.perf_counter() - origin


def _chunk_output(choice: dict, chat: bool, result: RequestResult) -> tuple[str | None, bool]:
    """(the chunk's content text, whether it carried any output): a chat delta's reasoning and tool-call
    fragments are output too (their tokens are in usage), so they time the stream like text does."""
    if not chat:
        text = choice.get("text")
        return text, bool(text)
    delta = choice.get("delta") or {}
    text = delta.get("content")
    calls = delta.get("tool_calls") or []
    result.tool_calls += sum(1 for call in calls if call.get("id"))
    fragments = "".join((call.get("function") or {}).get("arguments") or "" for call in calls)
    named = any((call.get("function") or {}).get("name") for call in calls)
    return text, bool(text or delta.get("reasoning_content") or fragments or named)


class Run:
    """One endpoint, one load: schedules arrivals, keeps chat histories, collects RequestResults."""

    def __init__(self, endpoint: Endpoint, workload: list[BenchRequest], config: LoadConfig,
                 tokenizer: BenchTokenizer | None, label: str = "",
                 warmup_workload: list[BenchRequest] | None = None) -> None:
        self.endpoint, self.workload, self.config, self.tokenizer, self.label = endpoint, workload, config, tokenizer, label
        # Prompts of their own keep the warm-ups' KV blocks out of the measured requests' prefix-cache lookups.
        self.warmup_workload = warmup_workload or workload
        self.histories: dict[int, list[dict]] = {}
        self.turn_done: dict[tuple[int, int], asyncio.Event] = {}
        self.conversations_per_cycle = 1 + max((r.conversation_id or 0) for r in workload)

    def request_at(self, index: int) -> tuple[BenchRequest, int | None]:
        request = self.workload[index % len(self.workload)]
        if request.conversation_id is None:
            return request, None
        return request, request.conversation_id + (index // len(self.workload)) * self.conversations_per_cycle

    async def one(self, session, index: int, scheduled: float, origin: float, slots, bar) -> RequestResult:
        request, conversation = self.request_at(index)
        result = RequestResult(index=index, scheduled=scheduled, prompt_tokens=request.prompt_len,
                               conversation_id=conversation, turn=request.turn)
        if conversation is not None and request.turn > 0:
            previous = self.turn_done.setdefault((conversation, request.turn - 1), asyncio.Event())
            await previous.wait()
            # A user sends the next turn only after reading the reply: the arrival moves to then.
            result.scheduled = max(scheduled, time.perf_counter() - origin)
        history = self.histories.setdefault(conversation, []) if conversation is not None else []
        try:
            body = build_body(self.endpoint, request, history, self.config.ignore_eos, self.config.tools)
            if slots is not None:
                async with slots:
                    await stream_request(session, self.endpoint, body, result, origin, self.config.timeout)
            else:
                await stream_request(session, self.endpoint, body, result, origin, self.config.timeout)
            if result.success and not result.usage_from_server:
                result.output_tokens = len(self.tokenizer.encode(result.output_text)) if self.tokenizer else 0
        finally:  # later turns of the conversation wait on this one, whatever happened to it
            if conversation is not None:
                history += [{"role": "user", "content": request.user},
                            {"role": "assistant", "content": result.output_text}]
                self.turn_done.setdefault((conversation, request.turn), asyncio.Event()).set()
        bar.update(1)
        return result

    async def warm_up(self, session) -> None:
        if not self.config.num_warmups:
            return
        bodies = [build_body(self.endpoint, self.warmup_workload[i % len(self.warmup_workload)], [],
                             self.config.ignore_eos, self.config.tools)
                  for i in range(self.config.num_warmups)]
        origin = time.perf_counter()
        await asyncio.gather(*(stream_request(session, self.endpoint, body, RequestResult(-1, 0.0), origin,
                                              self.config.timeout) for body in bodies))

    async def run(self) -> list[RequestResult]:
        config = self.config
        connector = aiohttp.TCPConnector(limit=config.max_concurrency or 0, ttl_dns_cache=300)
        slots = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
        total = None if config.duration else len(self.workload)
        async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
            await self.warm_up(session)
            rng = np.random.default_rng(config.seed)
            with tqdm(total=total, desc=f"{self.endpoint.name} {self.label}".strip(), unit="req",
                      disable=not config.progress, leave=False) as bar:
                origin = time.perf_counter()
                tasks, scheduled = [], 0.0
                for index, gap in enumerate(arrival_intervals(rng, config.request_rate, config.burstiness)):
                    if index > 0:
                        scheduled += gap
                    if config.duration is None and index >= len(self.workload):
                        break
                    if config.duration is not None and scheduled > config.duration:
                        break
                    delay = origin + scheduled - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(self.one(session, index, scheduled, origin, slots, bar)))
                return list(await asyncio.gather(*tasks))


def run_endpoint(endpoint: Endpoint, workload: list[BenchRequest], config: LoadConfig,
                 tokenizer: BenchTokenizer | None, label: str = "",
                 warmup_workload: list[BenchRequest] | None = None) -> list[RequestResult]:
    return asyncio.run(Run(endpoint, workload, config, tokenizer, label, warmup_workload).run())
