"""The routing loop: which backend tries a request, what a failed try means, and the answer relayed back.

A request is tried on one backend at a time. Until its first byte has reached the client, a failure the backend
caused (refused, reset, timeout, a 5xx that does not blame the request, 429) sends it to another backend of the
group, and a context-length rejection sends it to the group's context-window fallback; after that the bytes
stream through unchanged, chunk by chunk, and a failure is reported inside the stream. Response headers are
sent only once the backend's first chunk is in hand, which is what makes the retry invisible to the client.

An answer the request caused (serval.router.failures) is relayed at once and never held against the backend.
A request that failed on a backend that had read it is tried on at most one more: if the request is what
breaks backends, replaying it across the fleet would break them all.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass

import aiohttp
from starlette.datastructures import Headers
from starlette.responses import Response

from serval.openai.errors import APIError
from serval.router import metrics as m
from serval.router.backends import Backend, build_backends
from serval.router.breaker import OPEN
from serval.router.config import GroupConfig, RouterConfig
from serval.router.failures import AttemptFailed, error_fields, request_at_fault
from serval.guard.session import GuardMetricsObserver
from serval.openai.sse import ClosingStreamingResponse
from serval.router.guarding import RouterGuardSession
from serval.router.health import check_all, health_loop
from serval.router.policies import make_policy
from serval.router.relay import StreamRelay
from serval.router.request_info import RouteRequest, route_request
from serval.router.responses import RESPONSES_PATH, ResponseHome, ResponseHomes, StreamIdReader, not_found, \
    whole_response_id

logger = logging.getLogger("serval.router")

BACKEND_HEADER = "x-serval-backend"  # names the backend that answered; useful in logs, tests and debugging
FORWARDED_HEADERS = ("traceparent", "tracestate")  # W3C trace context: the backend's spans join the client's trace
RELAYED_ERROR_HEADERS = ("retry-after",)
# Tries on backends that read the request and failed: the first, and at most one more.
MAX_FAILED_TRIES = 2
# Retry-After on a relayed 429 whose backend gave none: clients back off by at least this.
DEFAULT_RETRY_AFTER_S = 1


@dataclass
class RoutedRequest:
    """One client request as the router received it: what each attempt sends and logs."""
    path: str  # /v1/completions, /v1/chat/completions or /v1/responses
    body: dict
    body_bytes: bytes  # sent as they are when the backend takes the model name the client gave
    headers: Headers  # the client's (trace context is forwarded, the session header read)
    request_id: str
    started: float  # the router's clock when the request arrived
    session: RouterGuardSession  # a pass-through one without --policy
    owner: str = ""  # who stored responses belong to (serval.router.responses.client_owner)

    @property
    def chat(self) -> bool:
        return self.path.endswith("chat/completions")


@dataclass
class Attempt:
    """One try of a request on one backend."""
    request: RoutedRequest
    backend: Backend
    group: GroupConfig
    reason: str  # why the policy chose this backend
    number: int  # 1 for the first try of the request in its group


class Router:
    def __init__(self, config: RouterConfig, clock=time.monotonic, guard=None) -> None:
        self.config = config
        self.clock = clock
        self.guard = guard  # serval.guard.guard.Guard from `--policy`, or None
        self.backends = build_backends(config)
        self.policies = {name: make_policy(group) for name, group in config.groups.items()}
        self.metrics = m.RouterMetrics(self.backends, clock)
        if guard is not None:
            guard.observers.append(GuardMetricsObserver(self.metrics.guard_decisions, self.metrics.guard_latency))
        self.session: aiohttp.ClientSession | None = None
        self.response_homes = ResponseHomes()  # which backend stores each relayed Responses API response
        self._health_task: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        # aiohttp rather than httpx: httpcore's pool re-checks every pooled connection's socket on each request,
        # which measured as most of the router's CPU at 32 requests in flight (docs/performance.md); and
        # aiohttp is already a dependency (the benchmark client). Keep-alive connections to every backend;
        # no overall deadline (generations are long), but bounded connect and per-read silence.
        timeout = aiohttp.ClientTimeout(total=None, connect=self.config.connect_timeout,
                                        sock_read=self.config.read_timeout)
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                                             timeout=timeout, auto_decompress=False)
        if self.config.health_check_interval > 0:
            await check_all(self.session, self.backends, self.config.health_check_timeout)
            self._health_task = asyncio.create_task(health_loop(
                self.session, self.backends, self.config.health_check_interval, self.config.health_check_timeout))

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self.session is not None:
            await self.session.close()
        if self.guard is not None:
            await self.guard.aclose()

    # ------------------------------------------------------------------ routing
    def candidates(self, group: GroupConfig, tried: set[str]) -> tuple[list[Backend], dict]:
        """(backends that may take the request now, why each other one may not)."""
        now = self.clock()
        chosen, excluded = [], {}
        for name in group.backends:
            backend = self.backends[name]
            if name in tried:
                excluded[name] = "already tried"
            elif not backend.available(now):
                excluded[name] = backend.unavailable_reason(now)
            else:
                chosen.append(backend)
        return chosen, excluded

    def capable(self, group: GroupConfig, request: RouteRequest) -> list[Backend]:
        """The group's backends that can serve the request at all (modalities, structured output)."""
        out = []
        for name in group.backends:
            backend = self.backends[name]
            if not request.modalities <= set(backend.config.modalities):
                continue
            if request.needs_structured_output and backend.config.structured_output is False:
                continue
            out.append(backend)
        return out

    def fits(self, backend: Backend, request: RouteRequest) -> bool:
        limit = backend.max_context
        return limit is None or request.estimated_total_tokens <= limit

    async def route(self, request: RoutedRequest) -> Response:
        group = self.resolve_group(request.body)
        info = route_request(request.body, request.headers, group.session_header)
        home = self._previous_response_home(request, group)
        tried: set[str] = set()
        failures: list[str] = []
        fallbacks_left = list(self.config.context_window_fallbacks.get(group.name, []))
        attempts = failed_tries = 0
        last: AttemptFailed | None = None
        while True:
            capable = {backend.name for backend in self.capable(group, info)}
            if not capable:
                raise APIError(400, f"No backend of model `{group.name}` accepts this request: it needs "
                                    f"{sorted(info.modalities)} input"
                                    f"{' and structured output' if info.needs_structured_output else ''}.",
                               param="messages", code="unsupported_request")
            candidates, excluded = self.candidates(group, tried)
            candidates = [backend for backend in candidates if backend.name in capable]
            if home is not None:  # the conversation's state is in that backend's store: nowhere else will do
                candidates = [backend for backend in candidates if backend.name == home]
            fitting = [backend for backend in candidates if self.fits(backend, info)]
            if not fitting and candidates and fallbacks_left:
                group = self._fall_back(group, fallbacks_left, "estimated prompt too long")
                continue
            candidates = fitting or candidates  # none fits by estimate: let the backend itself decide
            out_of_retries = attempts > self.config.num_retries or failed_tries >= MAX_FAILED_TRIES
            if not candidates or out_of_retries:
                return self._give_up(group, excluded, failures, last, out_of_retries)
            decision = self.policies[group.name].choose(candidates, info)
            backend = decision.backend
            self.metrics.decisions.labels(group.name, group.policy, backend.name, decision.reason).inc()
            tried.add(backend.name)
            if not backend.breaker.acquire(self.clock()):
                continue  # another request took the half-open probe slot meanwhile
            attempts += 1
            if last is not None:
                self.metrics.retries.labels(group.name, last.outcome).inc()
            attempt = Attempt(request, backend, group, decision.reason, attempts)
            try:
                return await self.attempt(attempt)
            except AttemptFailed as failure:
                failure.attempt = attempt
                self.metrics.requests.labels(backend.name, group.name, failure.outcome).inc()
                failures.append(f"{backend.name}: {failure.detail}")
                logger.warning("backend attempt failed", extra={
                    "request_id": request.request_id, "backend": backend.name, "model": group.name,
                    "outcome": failure.outcome, "error": failure.detail})
                if failure.outcome == m.CONTEXT_EXCEEDED:
                    if not fallbacks_left:
                        self.log_routed(attempt, failure.outcome, failure.response.status_code)
                        return failure.response
                    group = self._fall_back(group, fallbacks_left, "backend rejected the context length")
                    tried.clear()
                    attempts = failed_tries = 0  # a fallback is not a retry: the new group gets its own
                    last = None
                    continue
                last = failure
                failed_tries += failure.reached_backend

    def _previous_response_home(self, request: RoutedRequest, group: GroupConfig) -> str | None:
        """The backend a Responses API continuation must go to, when the router relayed the previous response."""
        previous = request.body.get("previous_response_id") if request.path == RESPONSES_PATH else None
        if not isinstance(previous, str) or not self.response_homes.is_known(previous):
            return None  # unknown here: the backend it lands on answers from its own store
        home = self.response_homes.find(previous, request.owner)
        if home is None:
            raise not_found(previous, "previous_response_id")
        return home.backend if home.backend in group.backends else None

    def _remember_response(self, attempt: Attempt, response_id: str | None) -> None:
        if response_id is not None:
            self.response_homes.remember(response_id, ResponseHome(attempt.backend.name, attempt.request.owner))

    async def _remembering(self, attempt: Attempt, first: bytes, chunks):
        """The stream's chunks as they are, the response id read from its first event on the way."""
        reader = StreamIdReader()
        self._remember_response(attempt, reader.feed(first))
        async for chunk in chunks:
            if not reader.done:
                self._remember_response(attempt, reader.feed(chunk))
            yield chunk

    def resolve_group(self, body: dict) -> GroupConfig:
        model = body.get("model")
        if model is None and len(self.config.groups) == 1:
            model = next(iter(self.config.groups))  # attempt() then writes it into the body it sends
        if not isinstance(model, str):
            raise APIError(400, f"`model` must be a string naming one of {self.config.public_names()}; "
                                f"got {model!r}.", param="model")
        group = self.config.group_for(model)
        if group is None:
            raise APIError(404, f"The model `{model}` does not exist; this router serves "
                                f"{self.config.public_names()}.", param="model", code="model_not_found")
        return group

    def _fall_back(self, group: GroupConfig, fallbacks_left: list[str], why: str) -> GroupConfig:
        target = self.config.groups[fallbacks_left.pop(0)]
        self.metrics.fallbacks.labels(group.name, target.name).inc()
        logger.info("context-window fallback", extra={"model": group.name, "fallback": target.name, "why": why})
        return target

    def _give_up(self, group: GroupConfig, excluded: dict, failures: list[str],
                 last: AttemptFailed | None, out_of_retries: bool) -> Response:
        if last is not None and last.response is not None:
            # The backend's own answer (its 5xx, or its 429 with Retry-After) tells the client more than ours.
            self.log_routed(last.attempt, last.outcome, last.response.status_code)
            return last.response
        self.metrics.requests.labels("none", group.name, m.NO_BACKEND).inc()
        reasons = failures + [f"{name}: {why}" for name, why in excluded.items() if why != "already tried"]
        lead = ("Every attempt failed" if out_of_retries or failures
                else "No backend can serve this request now")
        retry_after = self._seconds_until_a_breaker_half_opens(group)
        return APIError(503, f"{lead} for model `{group.name}` ({'; '.join(reasons) or 'no backends'}). "
                             "Retry later.", type="server_error", code="no_backend_available",
                        headers={"Retry-After": str(retry_after)} if retry_after is not None else None).response()

    def _seconds_until_a_breaker_half_opens(self, group: GroupConfig) -> int | None:
        now = self.clock()
        waits = [backend.breaker.opened_at + backend.breaker.cooldown - now
                 for backend in (self.backends[name] for name in group.backends)
                 if backend.breaker.current_state(now) == OPEN]
        return max(1, math.ceil(min(waits))) if waits else None

    # ------------------------------------------------------------------ one attempt
    async def attempt(self, attempt: Attempt) -> Response:
        backend, request = attempt.backend, attempt.request
        model = backend.model_for(attempt.group.name)
        payload = (request.body_bytes if request.body.get("model") == model
                   else json.dumps({**request.body, "model": model}).encode())
        # identity: relay the backend's bytes as they are, never a compressed stream to re-chunk
        headers = {"content-type": "application/json", "x-request-id": request.request_id,
                   "accept-encoding": "identity"}
        for name in FORWARDED_HEADERS:
            if name in request.headers:
                headers[name] = request.headers[name]
        if backend.config.api_key:
            headers["authorization"] = f"Bearer {backend.config.api_key}"
        backend.in_flight += 1
        sent = self.clock()
        handed_over = False  # once a stream is returned, its relay owns in_flight and the breaker
        response = None
        try:
            try:
                response = await self.session.post(backend.config.url + request.path, data=payload, headers=headers)
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                # A refused or timed-out connection never carried the request: it cannot be the request's fault.
                reached = not isinstance(error, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))
                if isinstance(error, asyncio.TimeoutError):
                    raise self._backend_failed(backend, m.TIMEOUT, f"timed out connecting or waiting "
                                                                   f"({type(error).__name__})", reached)
                raise self._backend_failed(backend, m.BACKEND_ERROR, f"{type(error).__name__}: {error}", reached)
            if response.status != 200 or "text/event-stream" not in response.headers.get("content-type", ""):
                return await self._whole_response(attempt, response, sent)
            try:
                chunks = response.content.iter_any()  # whatever has arrived, as soon as it has: no re-buffering
                first = await anext(chunks)
            except (aiohttp.ClientError, asyncio.TimeoutError, StopAsyncIteration) as error:
                response.close()
                outcome = m.TIMEOUT if isinstance(error, asyncio.TimeoutError) else m.BACKEND_ERROR
                raise self._backend_failed(backend, outcome, "stream broke before its first chunk "
                                                             f"({type(error).__name__})")
            first_byte = self.clock() - sent
            self.metrics.first_byte_latency.labels(backend.name).observe(first_byte)
            backend.observe_ttft(first_byte)
            handed_over = True
            if request.path == RESPONSES_PATH:
                chunks = self._remembering(attempt, first, chunks)
            rewriter = request.session.stream_rewriter(request.chat)
            relay = StreamRelay(self, attempt, response, first, chunks, rewriter)
            return ClosingStreamingResponse(relay.events(), relay.close, status_code=200,
                                            media_type="text/event-stream",
                                            headers={BACKEND_HEADER: backend.name, "cache-control": "no-cache",
                                                     "x-accel-buffering": "no"})
        except asyncio.CancelledError:
            backend.breaker.release()
            raise
        finally:
            if not handed_over:
                backend.in_flight -= 1
                if response is not None:
                    response.close()  # a no-op once released; otherwise (cancelled) the backend must abort

    def _backend_failed(self, backend: Backend, outcome: str, detail: str, reached_backend: bool = True,
                        response: Response | None = None) -> AttemptFailed:
        if outcome == m.OVERLOADED:
            backend.breaker.release()  # busy, not broken
        else:
            backend.breaker.record_failure(self.clock())
        return AttemptFailed(outcome, detail, reached_backend, response)

    async def _whole_response(self, attempt: Attempt, response: aiohttp.ClientResponse, sent: float) -> Response:
        backend, request = attempt.backend, attempt.request
        try:
            content = await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            outcome = m.TIMEOUT if isinstance(error, asyncio.TimeoutError) else m.BACKEND_ERROR
            raise self._backend_failed(backend, outcome, f"response broke off ({type(error).__name__})")
        finally:
            response.release()
        status = response.status
        headers = {BACKEND_HEADER: backend.name}
        headers.update({name: response.headers[name] for name in RELAYED_ERROR_HEADERS if name in response.headers})
        if status == 429:
            headers.setdefault("retry-after", str(DEFAULT_RETRY_AFTER_S))
            relayed = Response(content, status_code=status, media_type=response.headers.get("content-type"),
                               headers=headers)
            raise self._backend_failed(backend, m.OVERLOADED, "HTTP 429 (overloaded)", response=relayed)
        if status >= 500 and not request_at_fault(status, content):
            relayed = Response(content, status_code=status, media_type=response.headers.get("content-type"),
                               headers=headers)
            raise self._backend_failed(backend, m.BACKEND_ERROR,
                                       f"HTTP {status}: {content[:200].decode(errors='replace')}", response=relayed)
        self.metrics.first_byte_latency.labels(backend.name).observe(self.clock() - sent)
        if status == 200:
            content = request.session.filter_whole(content, request.chat)  # output rails, and the usage to charge
            if request.path == RESPONSES_PATH:
                self._remember_response(attempt, whole_response_id(content))
        relayed = Response(content, status_code=status, media_type=response.headers.get("content-type"),
                           headers=headers)
        if status >= 500:
            backend.breaker.release()  # the request broke it, not the backend: neither health nor failure
        else:
            backend.breaker.record_success()  # it answered: alive, whatever the answer says of the request
        if status == 400 and error_fields(content).get("code") == "context_length_exceeded":
            raise AttemptFailed(m.CONTEXT_EXCEEDED, "context length exceeded", response=relayed)
        self.finished(attempt, m.SUCCESS if status < 400 else m.CLIENT_ERROR, status)
        return relayed

    def finished(self, attempt: Attempt, outcome: str, status: int, stream: bool = False) -> None:
        """The attempt that answered the client: its outcome counted, the request's latency and log line."""
        self.metrics.requests.labels(attempt.backend.name, attempt.group.name, outcome).inc()
        self.log_routed(attempt, outcome, status, stream)

    def log_routed(self, attempt: Attempt, outcome: str, status: int, stream: bool = False) -> None:
        request, group = attempt.request, attempt.group
        elapsed = self.clock() - request.started
        self.metrics.request_latency.labels(group.name).observe(elapsed)
        logger.info("request routed", extra={
            "request_id": request.request_id, "model": group.name, "policy": group.policy,
            "reason": attempt.reason, "backend": attempt.backend.name, "attempts": attempt.number,
            "status": status, "outcome": outcome, "stream": stream, "total_s": round(elapsed, 4)})
