"""The gateway: an OpenAI-compatible Starlette app that routes each request to a backend and relays the answer.

A request is tried on one backend at a time. Until its first byte has reached the client, a failure
(refused, reset, timeout, 5xx, 429) sends it to another backend of the group, and a context-length rejection
sends it to the group's context-window fallback; after that the bytes stream through unchanged, chunk by
chunk, and a failure is reported inside the stream. Response headers are sent only once the backend's
first chunk is in hand, which is what makes the retry invisible to the client.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
import uuid
from contextlib import aclosing

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from serval.router import metrics as m
from serval.router.backends import Backend, build_backends
from serval.router.config import GroupConfig, RouterConfig
from serval.router.errors import RouterError
from serval.router.guarding import GuardObserver, GuardSession, StreamRewriter
from serval.router.health import check_all, health_loop
from serval.router.policies import make_policy
from serval.router.request_info import RouteRequest, route_request
from serval.openai.disconnect import until_disconnect

logger = logging.getLogger("serval.router")

BACKEND_HEADER = "x-serval-backend"  # names the backend that answered; useful in logs, tests and debugging
FORWARDED_HEADERS = ("traceparent", "tracestate")  # W3C trace context: the backend's spans join the client's trace
RETRYABLE_STATUS = (500, 502, 503, 504)


class _Failed(Exception):
    """An attempt that failed before anything reached the client."""

    def __init__(self, outcome: str, detail: str, response: Response | None = None) -> None:
        super().__init__(detail)
        self.outcome, self.detail, self.response = outcome, detail, response


class Router:
    def __init__(self, config: RouterConfig, clock=time.monotonic, guard=None) -> None:
        self.config = config
        self.clock = clock
        self.guard = guard  # serval.guard.guard.Guard from `--policy`, or None
        self.backends = build_backends(config)
        self.policies = {name: make_policy(group) for name, group in config.groups.items()}
        self.metrics = m.RouterMetrics(self.backends, clock)
        if guard is not None:
            guard.observers.append(GuardObserver(self.metrics))
        self.session: aiohttp.ClientSession | None = None
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

    def reload_policy(self) -> None:
        """SIGHUP: re-read the guard policy; a bad file is logged and the running policy stays."""
        from serval.guard.policy import PolicyError
        try:
            self.guard.reload()
        except PolicyError as error:
            logger.error("policy reload failed; keeping the running policy", extra={"error": str(error)})

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self.session is not None:
            await self.session.close()
        if self.guard is not None:
            await self.guard.classifier_client.close()

    # ------------------------------------------------------------------ routing
    def candidates(self, group: GroupConfig, request: RouteRequest, tried: set[str]) -> tuple[list[Backend], dict]:
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

    async def route(self, raw: Request, path: str, body: dict, body_bytes: bytes, request_id: str,
                    session: GuardSession | None = None) -> Response:
        started = self.clock()
        group = self.resolve_group(body)
        request = route_request(body, raw.headers, group.session_header)
        tried: set[str] = set()
        failures: list[str] = []
        fallbacks_left = list(self.config.context_window_fallbacks.get(group.name, []))
        attempts = 0
        while True:
            capable = {backend.name for backend in self.capable(group, request)}
            if not capable:
                raise RouterError(400, f"No backend of model `{group.name}` accepts this request: it needs "
                                       f"{sorted(request.modalities)} input"
                                       f"{' and structured output' if request.needs_structured_output else ''}.",
                                  param="messages", code="unsupported_request")
            candidates, excluded = self.candidates(group, request, tried)
            candidates = [backend for backend in candidates if backend.name in capable]
            fitting = [backend for backend in candidates if self.fits(backend, request)]
            if not fitting and candidates and fallbacks_left:
                group = self._fall_back(group, fallbacks_left, "estimated prompt too long")
                continue
            candidates = fitting or candidates  # none fits by estimate: let the backend itself decide
            if not candidates or attempts > self.config.num_retries:
                return self._no_backend(group, excluded, failures, attempts > self.config.num_retries)
            decision = self.policies[group.name].choose(candidates, request)
            backend = decision.backend
            self.metrics.decisions.labels(group.name, group.policy, backend.name, decision.reason).inc()
            tried.add(backend.name)
            if not backend.breaker.acquire(self.clock()):
                continue  # another request took the half-open probe slot meanwhile
            attempts += 1
            try:
                return await self.attempt(backend, group, path, body, body_bytes, raw, request_id, started,
                                          decision.reason, attempts, session)
            except _Failed as failure:
                self.metrics.requests.labels(backend.name, group.name, failure.outcome).inc()
                failures.append(f"{backend.name}: {failure.detail}")
                logger.warning("backend attempt failed", extra={
                    "request_id": request_id, "backend": backend.name, "model": group.name,
                    "outcome": failure.outcome, "error": failure.detail})
                if failure.outcome == m.CONTEXT_EXCEEDED:
                    if not fallbacks_left:
                        return failure.response
                    group = self._fall_back(group, fallbacks_left, "backend rejected the context length")
                    tried.clear()
                    attempts = 0  # a fallback is not a retry: the new group gets its own
                    continue
                self.metrics.retries.labels(group.name, failure.outcome).inc()

    def resolve_group(self, body: dict) -> GroupConfig:
        model = body.get("model")
        if model is None and len(self.config.groups) == 1:
            model = next(iter(self.config.groups))  # attempt() then writes it into the body it sends
        if not isinstance(model, str):
            raise RouterError(400, f"`model` must be a string naming one of {self.config.public_names()}; "
                                   f"got {model!r}.", param="model")
        group = self.config.group_for(model)
        if group is None:
            raise RouterError(404, f"The model `{model}` does not exist; this router serves "
                                   f"{self.config.public_names()}.", param="model", code="model_not_found")
        return group

    def _fall_back(self, group: GroupConfig, fallbacks_left: list[str], why: str) -> GroupConfig:
        target = self.config.groups[fallbacks_left.pop(0)]
        self.metrics.fallbacks.labels(group.name, target.name).inc()
        logger.info("context-window fallback", extra={"model": group.name, "fallback": target.name, "why": why})
        return target

    def _no_backend(self, group: GroupConfig, excluded: dict, failures: list[str], out_of_retries: bool) -> Response:
        self.metrics.requests.labels("none", group.name, m.NO_BACKEND).inc()
        reasons = failures + [f"{name}: {why}" for name, why in excluded.items() if why != "already tried"]
        lead = ("Every attempt failed" if out_of_retries or failures
                else "No backend can serve this request now")
        return RouterError(503, f"{lead} for model `{group.name}` ({'; '.join(reasons) or 'no backends'}). "
                                "Retry later.", type="server_error", code="no_backend_available").response()

    # ------------------------------------------------------------------ one attempt
    async def attempt(self, backend: Backend, group: GroupConfig, path: str, body: dict, body_bytes: bytes,
                      raw: Request, request_id: str, started: float, reason: str, attempts: int,
                      session: GuardSession | None = None) -> Response:
        model = backend.model_for(group.name)
        payload = body_bytes if body.get("model") == model else json.dumps({**body, "model": model}).encode()
        # identity: relay the backend's bytes as they are, never a compressed stream to re-chunk
        headers = {"content-type": "application/json", "x-request-id": request_id, "accept-encoding": "identity"}
        for name in FORWARDED_HEADERS:
            if name in raw.headers:
                headers[name] = raw.headers[name]
        if backend.config.api_key:
            headers["authorization"] = f"Bearer {backend.config.api_key}"
        backend.in_flight += 1
        sent = self.clock()
        handed_over = False  # once a stream is returned, its relay owns in_flight and the breaker
        response = None
        try:
            try:
                response = await self.session.post(backend.config.url + path, data=payload, headers=headers)
            except asyncio.TimeoutError as error:
                raise self._failure(backend, m.TIMEOUT, f"timed out connecting or waiting ({type(error).__name__})")
            except aiohttp.ClientError as error:
                raise self._failure(backend, m.BACKEND_ERROR, f"{type(error).__name__}: {error}")
            if response.status != 200 or "text/event-stream" not in response.headers.get("content-type", ""):
                return await self._whole_response(backend, group, response, started, sent, request_id, reason,
                                                  attempts, session, path.endswith("chat/completions"))
            try:
                chunks = response.content.iter_any()  # whatever has arrived, as soon as it has: no re-buffering
                first = await anext(chunks)
            except (aiohttp.ClientError, asyncio.TimeoutError, StopAsyncIteration) as error:
                response.close()
                outcome = m.TIMEOUT if isinstance(error, asyncio.TimeoutError) else m.BACKEND_ERROR
                raise self._failure(backend, outcome, f"stream broke before its first chunk ({type(error).__name__})")
            first_byte = self.clock() - sent
            self.metrics.first_byte_latency.labels(backend.name).observe(first_byte)
            backend.observe_ttft(first_byte)
            handed_over = True
            rewriter = session.stream_rewriter(path.endswith("chat/completions")) if session is not None else None
            relay = _Relay(self, backend, group, response, first, chunks, (started, request_id, reason, attempts),
                           session, rewriter)
            return _ClosingStreamingResponse(relay.events(), relay.close, status_code=200,
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

    def _failure(self, backend: Backend, outcome: str, detail: str) -> _Failed:
        if outcome == m.OVERLOADED:
            backend.breaker.release()  # busy, not broken
        else:
            backend.breaker.record_failure(self.clock())
        return _Failed(outcome, detail)

    async def _whole_response(self, backend: Backend, group: GroupConfig, response: aiohttp.ClientResponse,
                              started: float, sent: float, request_id: str, reason: str, attempts: int,
                              session: GuardSession | None, chat: bool) -> Response:
        try:
            content = await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            outcome = m.TIMEOUT if isinstance(error, asyncio.TimeoutError) else m.BACKEND_ERROR
            raise self._failure(backend, outcome, f"response broke off ({type(error).__name__})")
        finally:
            response.release()
        status = response.status
        if status in RETRYABLE_STATUS:
            raise self._failure(backend, m.BACKEND_ERROR, f"HTTP {status}: {content[:200].decode(errors='replace')}")
        if status == 429:
            raise self._failure(backend, m.OVERLOADED, "HTTP 429 (overloaded)")
        self.metrics.first_byte_latency.labels(backend.name).observe(self.clock() - sent)
        if session is not None and status == 200:
            content = session.filter_whole(content, chat)  # output rails, and the usage to charge
        relayed = Response(content, status_code=status, media_type=response.headers.get("content-type"),
                           headers={BACKEND_HEADER: backend.name})
        backend.breaker.record_success()  # it answered: alive, whatever the answer says of the request
        if status == 400 and _error_code(content) == "context_length_exceeded":
            raise _Failed(m.CONTEXT_EXCEEDED, "context length exceeded", relayed)
        outcome = m.SUCCESS if status < 400 else m.CLIENT_ERROR
        self._finished(backend, group, outcome, status, started, request_id, reason, attempts, stream=False)
        return relayed

    def _finished(self, backend: Backend, group: GroupConfig, outcome: str, status: int, started: float,
                  request_id: str, reason: str, attempts: int, stream: bool) -> None:
        elapsed = self.clock() - started
        self.metrics.requests.labels(backend.name, group.name, outcome).inc()
        self.metrics.request_latency.labels(group.name).observe(elapsed)
        logger.info("request routed", extra={
            "request_id": request_id, "model": group.name, "policy": group.policy, "reason": reason,
            "backend": backend.name, "attempts": attempts, "status": status, "outcome": outcome,
            "stream": stream, "total_s": round(elapsed, 4)})

    # ------------------------------------------------------------------ small endpoints
    def models(self) -> dict:
        created = int(time.time())
        cards = []
        for group in self.config.groups.values():
            lengths = [self.backends[name].max_context for name in group.backends]
            known = [length for length in lengths if length is not None]
            for name in (group.name, *group.aliases):
                cards.append({"id": name, "object": "model", "created": created, "owned_by": "serval-router",
                              "root": group.name, "max_model_len": max(known) if known else None,
                              "backends": list(group.backends)})
        return {"object": "list", "data": cards}

    def health(self) -> Response:
        now = self.clock()
        status = {name: {"healthy": b.healthy, "breaker": b.breaker.current_state(now), "in_flight": b.in_flight}
                  for name, b in self.backends.items()}
        if not any(backend.available(now) for backend in self.backends.values()):
            return RouterError(503, f"No backend is available: {status}", type="server_error").response()
        return JSONResponse({"status": "ok", "backends": status})


# ---------------------------------------------------------------------- the app
def build_app(router: Router) -> Starlette:
    async def completions(raw: Request) -> Response:
        return await _handle(router, raw, "/v1/completions")

    async def chat_completions(raw: Request) -> Response:
        return await _handle(router, raw, "/v1/chat/completions")

    async def models(_: Request) -> Response:
        return JSONResponse(router.models())

    async def health(_: Request) -> Response:
        return router.health()

    async def metrics(_: Request) -> Response:
        return Response(router.metrics.render(), media_type=m.CONTENT_TYPE)

    async def not_found(raw: Request, _exc) -> Response:
        return RouterError(404, f"No route {raw.method} {raw.url.path}; the router serves /v1/completions, "
                                "/v1/chat/completions, /v1/models, /health, /metrics.",
                           type="not_found_error").response()

    async def not_allowed(raw: Request, _exc) -> Response:
        return RouterError(405, f"Method {raw.method} is not allowed on {raw.url.path}.").response()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await router.start()
        if router.guard is not None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, router.reload_policy)
        logger.info("routing", extra={"models": router.config.public_names(), "backends": list(router.backends),
                                      "policy": router.guard.policy.source if router.guard is not None else None})
        yield
        await router.stop()

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_allowed})
    app.state.router = router
    return app


async def _handle(router: Router, raw: Request, path: str) -> Response:
    request_id = raw.headers.get("x-request-id") or f"route-{uuid.uuid4().hex}"
    session, response = None, None
    try:
        guard_keys = router.guard is not None and router.guard.requires_keys  # then the policy's keys decide
        if router.config.api_keys and not guard_keys and not _authorized(raw, router.config.api_keys):
            raise RouterError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                              code="invalid_api_key")
        body_bytes = await raw.body()
        body = _parse_body(body_bytes)
        if router.guard is not None:
            session = GuardSession(router.guard, request_id)
            if await session.admit(body, raw.headers):
                body_bytes = json.dumps(body).encode()
        try:
            response = await until_disconnect(raw, router.route(raw, path, body, body_bytes, request_id, session))
        finally:
            if session is not None and not isinstance(response, _ClosingStreamingResponse):
                session.release()  # a stream's relay releases when it ends
        return response if response is not None else Response(status_code=499)
    except RouterError as error:
        return error.response(headers=error.headers)
    except Exception as error:  # noqa: BLE001 - the gateway stays up; say what broke
        logger.exception("unexpected error while routing", extra={"request_id": request_id})
        return RouterError(500, f"internal router error: {error!r}", type="server_error").response()


def _parse_body(data: bytes) -> dict:
    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RouterError(400, f"The body is not valid JSON: {error}") from error
    if not isinstance(body, dict):
        raise RouterError(400, f"The body must be a JSON object, got {type(body).__name__}.")
    return body


def _authorized(raw: Request, keys: list[str]) -> bool:
    header = raw.headers.get("authorization", "")
    return header.startswith("Bearer ") and header[7:] in keys


def _error_code(content: bytes) -> str | None:
    try:
        error = json.loads(content).get("error")
        return error.get("code") if isinstance(error, dict) else None
    except (ValueError, AttributeError):
        return None


class _Relay:
    """One backend stream relayed to the client, chunk by chunk as they arrive (no buffering, no parsing).

    close() settles the attempt exactly once (in-flight count, breaker, metrics, log line) however the
    response ends, even when the client left before the first chunk was sent and the generator never ran.
    """

    def __init__(self, router: Router, backend: Backend, group: GroupConfig, response: aiohttp.ClientResponse,
                 first: bytes, chunks, context: tuple, session: GuardSession | None = None,
                 rewriter: StreamRewriter | None = None) -> None:
        self.router, self.backend, self.group, self.response = router, backend, group, response
        self.first, self.chunks, self.context = first, chunks, context
        self.session, self.rewriter = session, rewriter
        self.outcome = m.CLIENT_DISCONNECT  # until the stream ends one way or the other
        self.closed = False

    async def events(self):
        try:
            if self.rewriter is None:
                yield self.first
                async for chunk in self.chunks:
                    yield chunk
            else:
                async for out in self._rewritten():
                    yield out
            self.outcome = m.SUCCESS
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            # Too late to retry: the client has bytes. Say so inside the stream, as `serval serve` does.
            self.outcome = m.STREAM_ERROR
            message = f"backend {self.backend.name} failed mid-stream: {type(error).__name__}"
            error_body = {"error": {"message": message, "type": "server_error", "param": None,
                                    "code": "backend_failed"}}
            yield f"data: {json.dumps(error_body)}\n\ndata: [DONE]\n\n".encode()
        finally:
            await self.close()

    async def _rewritten(self):
        """The stream through the guard's output rails, event by event."""
        rewriter = self.rewriter
        for chunk in (self.first,):
            out = rewriter.feed(chunk)
            if out:
                yield out
        if rewriter.all_stopped:
            yield b"data: [DONE]\n\n"
            return
        async for chunk in self.chunks:
            out = rewriter.feed(chunk)
            if out:
                yield out
            if rewriter.all_stopped:  # every choice ended by a stop rail: end here, the backend is dropped
                yield b"data: [DONE]\n\n"
                return
        tail = rewriter.end()
        if tail:
            yield tail

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.session is not None:
            self.session.release()
        backend, router = self.backend, self.router
        backend.in_flight -= 1
        if self.outcome == m.SUCCESS:
            backend.breaker.record_success()
        elif self.outcome == m.STREAM_ERROR:
            backend.breaker.record_failure(router.clock())
        else:
            backend.breaker.release()
        started, request_id, reason, attempts = self.context
        router._finished(backend, self.group, self.outcome, 200, started, request_id, reason, attempts, stream=True)
        if self.outcome == m.SUCCESS and self.response.content.at_eof():
            self.response.release()  # the connection goes back to the pool
        else:
            self.response.close()  # dropping the connection is what tells the backend to abort the request


class _ClosingStreamingResponse(StreamingResponse):
    """Closes the relay however the response ends (Starlette leaves a cancelled generator suspended), so
    the backend stream is closed and the backend aborts the request."""

    def __init__(self, content, on_close, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def stream_response(self, send) -> None:
        try:
            async with aclosing(self.body_iterator):
                await super().stream_response(send)
        finally:
            await self.on_close()


def serve(config: RouterConfig, host: str, port: int, guard=None, access_log: bool = False,
          log_level: str = "info") -> None:
    """Run the gateway until SIGINT/SIGTERM."""
    app = build_app(Router(config, guard=guard))
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=access_log, log_level=log_level,
                timeout_graceful_shutdown=5)
