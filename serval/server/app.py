"""The HTTP app: FastAPI routes over the handlers, the ASGI middleware in front of them (keys, drain, HTTP
metrics), the OpenAPI document with the request bodies, and `serve`, which runs it all on uvicorn.

Every route answers OpenAI's error body on failure; user input never yields a 500. A request whose client goes
away (streaming or not) is cancelled, which aborts its engine requests and frees their KV blocks.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from functools import partial

import uvicorn

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

import serval
from serval.guard.decisions import GuardRejection
from serval.guard.guard import Guard, RequestContext
from serval.guard.session import reload_policy
from serval.model.generation_config import GenerationDefaults
from serval.openai.auth import check_api_key
from serval.openai.errors import APIError
from serval.openai.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ErrorResponse, \
    TokenizeRequest
from serval.openai.embeddings import EmbeddingRequest, RerankRequest, ScoreRequest
from serval.openai.responses import ResponsesRequest
from serval.server import banner, embeddings, lora_routes, profile_routes, responses, serving, tokenization
from serval.server.lifecycle import handle, simple
from serval.server.metrics import CONTENT_TYPE
from serval.server.config import ServerConfig
from serval.server.drain import UVICORN_GRACE_S, DrainingServer
from serval.server.response_store import ResponseStore, ResponseStoreError
from serval.server.state import ServerState
from serval.server.tracing import RequestTracer

logger = logging.getLogger(__name__)

# Routes anyone may call: liveness for load balancers and supervisors, and the version (a constant).
OPEN_PATHS = frozenset({"/health", "/version"})
# The request body of each POST route, for the OpenAPI document (handlers read the raw body themselves, so that
# every error stays OpenAI-shaped).
REQUEST_BODIES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
                  "/v1/responses": ResponsesRequest, "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest,
                  "/v1/embeddings": EmbeddingRequest, "/v1/score": ScoreRequest, "/v1/rerank": RerankRequest}


def build_app(state: ServerState) -> "ObservedApp":
    """Raises ResponseStoreError when --responses-store cannot be opened."""
    app = FastAPI(title="Serval", version=serval.__version__, docs_url=None, redoc_url=None,
                  openapi_url=None if state.config.disable_fastapi_docs else "/openapi.json")
    app.state.server = state
    store = ResponseStore(state.config.responses_store, state.config.responses_max_stored)
    app.state.responses = store

    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
    async def completions(raw: Request):
        return await handle(state, raw, CompletionRequest, serving.create_completion, "text_completion")

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
    async def chat_completions(raw: Request):
        return await handle(state, raw, ChatCompletionRequest, serving.create_chat_completion, "chat")

    @app.post("/v1/responses", openapi_extra=_body_schema(ResponsesRequest))
    async def create_response(raw: Request):
        return await handle(state, raw, ResponsesRequest, partial(responses.create_response, store), "responses")

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(raw: Request, response_id: str):
        return await responses.retrieve_response(store, state, raw, response_id)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(raw: Request, response_id: str):
        return await responses.delete_response(store, state, raw, response_id)

    @app.get("/v1/responses/{response_id}/input_items")
    async def list_input_items(raw: Request, response_id: str):
        return await responses.list_input_items(store, state, raw, response_id)

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(response_id: str):
        return responses.refuse_cancel(response_id)

    # The pooling endpoints (--runner pooling); vLLM serves score and rerank under these paths too.
    @app.post("/v1/embeddings", openapi_extra=_body_schema(EmbeddingRequest))
    async def create_embedding(raw: Request):
        return await handle(state, raw, EmbeddingRequest, embeddings.create_embedding, "embeddings")

    @app.post("/v1/score", openapi_extra=_body_schema(ScoreRequest))
    @app.post("/score", include_in_schema=False)
    async def create_score(raw: Request):
        return await handle(state, raw, ScoreRequest, embeddings.create_score, "score")

    @app.post("/v1/rerank", openapi_extra=_body_schema(RerankRequest))
    @app.post("/rerank", include_in_schema=False)
    @app.post("/v2/rerank", include_in_schema=False)
    async def create_rerank(raw: Request):
        return await handle(state, raw, RerankRequest, embeddings.create_rerank, "rerank")
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(raw: Request):
        return await lora_routes.load_lora_adapter(state, raw)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(raw: Request):
        return await lora_routes.unload_lora_adapter(state, raw)

    @app.post("/start_profile")
    async def start_profile():
        return await profile_routes.start_profile(state)

    @app.post("/stop_profile")
    async def stop_profile():
        return await profile_routes.stop_profile(state)

    @app.get("/v1/models")
    async def models():
        return tokenization.models(state)

    @app.get("/health")
    async def health():
        if state.engine.is_dead:
            return APIError.unavailable("The engine has stopped; the server is restarting.").response()
        if state.draining:
            return APIError.unavailable("The server is shutting down.").response()
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": serval.__version__}

    @app.post("/tokenize", openapi_extra=_body_schema(TokenizeRequest))
    async def tokenize(raw: Request):
        return await simple(state, raw, TokenizeRequest, tokenization.tokenize)

    @app.post("/detokenize", openapi_extra=_body_schema(DetokenizeRequest))
    async def detokenize(raw: Request):
        return await simple(state, raw, DetokenizeRequest, tokenization.detokenize)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return APIError(error.status_code, str(error.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception):
        logger.error("unhandled error", exc_info=error)
        return APIError(500, "internal error", type="server_error").response()

    app.openapi = lambda: _openapi(app)
    return ObservedApp(app, state, {route.path for route in app.routes})


def _body_schema(model) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document, with the request bodies the routes read themselves and OpenAI's error body."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, definitions = models_json_schema([(model, "validation") for model in REQUEST_BODIES.values()]
                                            + [(ErrorResponse, "serialization")],
                                            ref_template="#/components/schemas/{model}")
        document.setdefault("components", {}).setdefault("schemas", {}).update(definitions["$defs"])
        app.openapi_schema = document
    return app.openapi_schema


class ObservedApp:
    """ASGI in front of the app: the key check, refusals while draining, the in-flight count and the HTTP metrics.
    Plain ASGI rather than BaseHTTPMiddleware, which would stand between the handlers and the disconnect messages
    they watch for."""

    def __init__(self, app: FastAPI, state: ServerState, routes: set[str]) -> None:
        self.app, self.server, self.routes = app, state, routes
        self.state = app.state
        self.open_paths = OPEN_PATHS if state.config.metrics_require_key else OPEN_PATHS | {"/metrics"}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.monotonic()
        status = 500
        path = scope["path"]
        counted = path not in ("/health", "/metrics")

        async def observed_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        if counted:
            self.server.enter()
        try:
            refusal = self._refusal(scope, path)
            if refusal is not None:
                status = refusal.status
                return await refusal.response()(scope, receive, send)
            await self.app(scope, receive, observed_send)
        finally:
            if counted:
                self.server.leave()
            # The route's template (/v1/responses/{response_id}), so that ids don't each become a label value.
            route = scope.get("route")
            handler = route.path if route is not None else path if path in self.routes else "other"
            self.server.metrics.observe_http(scope["method"], handler, status, time.monotonic() - started)

    def _refusal(self, scope, path: str) -> APIError | None:
        """Why this request is answered before it reaches a route, or None."""
        state = self.server
        if path not in self.open_paths:
            guard = state.guard
            authorization = _header(scope, b"authorization")
            if guard is not None and guard.requires_keys:
                try:
                    scope.setdefault("state", {})["guard_key"] = guard.authenticate(authorization, RequestContext())
                except GuardRejection as rejection:
                    return APIError.from_rejection(rejection)
            elif state.config.api_key is not None:
                try:
                    check_api_key(authorization, [state.config.api_key])
                except APIError as error:
                    return error
        if state.draining and path not in ("/health", "/metrics"):
            return APIError.unavailable("The server is shutting down; send the request to another replica.")
        return None


def _header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def _announce_when_listening(server: DrainingServer, state: ServerState) -> None:
    """The ready banner, once uvicorn has bound the port (the lifespan starts before it does)."""
    while not server.started:
        await asyncio.sleep(0.05)
    config = state.config
    ready = banner.ReadyBanner(banner.base_url(config.host, config.port), state.model_name,
                               needs_key=config.api_key is not None or (state.guard is not None
                                                                        and state.guard.requires_keys),
                               memory=banner.resident_memory(state.engine))
    logger.info("ready", extra={"url": ready.base_url, "model": state.model_name, **ready.memory.fields()})
    banner.write(ready.text())


def serve(engine, config: ServerConfig, guard: Guard | None = None,
          generation_defaults: GenerationDefaults | None = None) -> int:
    """Run the server until a signal drains it or the engine dies; shut the engine down; return the exit status
    (0 after a drain, 1 when the engine died). SIGHUP reloads the policy. `generation_defaults` fill the sampling
    fields a request leaves out."""
    tracer = RequestTracer(config.otlp_traces_endpoint) if config.otlp_traces_endpoint else None
    state = ServerState(engine, config, guard, tracer, generation_defaults)
    if generation_defaults is not None:
        logger.info("sampling defaults for requests that leave them out",
                    extra={"generation_config": generation_defaults.source, **generation_defaults.values()})
    try:
        app = build_app(state)
    except ResponseStoreError as error:
        logger.error("invalid server argument", extra={"error": str(error)})
        state.close()
        if tracer is not None:
            tracer.shutdown()
        engine.shutdown()
        return 2
    uvicorn_config = uvicorn.Config(app, host=config.host, port=config.port, log_config=None,
                                    access_log=config.access_log, log_level=config.log_level,
                                    timeout_graceful_shutdown=UVICORN_GRACE_S)
    server = DrainingServer(uvicorn_config, state, config.shutdown_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        loop = asyncio.get_running_loop()
        server.started_on(loop)
        if guard is not None:
            loop.add_signal_handler(signal.SIGHUP, reload_policy, guard)
        logger.info("serving", extra={"url": f"http://{config.host}:{config.port}", "model": state.model_name,
                                      "model_path": engine.config.model, "max_model_len": state.max_model_len,
                                      "policy": guard.policy.source if guard is not None else None})
        announce = loop.create_task(_announce_when_listening(server, state))
        yield
        announce.cancel()
        await server.stopped()
        if guard is not None:
            await guard.aclose()

    app.app.router.lifespan_context = lifespan
    try:
        server.run()
    finally:
        stopping = time.monotonic()
        state.close()
        app.state.responses.close()
        if tracer is not None:
            tracer.shutdown()
        engine.shutdown()
        logger.info("stopped", extra={"exit_code": server.exit_code,
                                      "engine_shutdown_s": round(time.monotonic() - stopping, 3)})
    return server.exit_code

