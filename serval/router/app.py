"""The gateway's Starlette app: the OpenAI endpoints, the client's key, the body read once, the guard session
opened and released, every failure answered with OpenAI's error body; and `serve`, which runs it."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
import uuid

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from serval.guard.session import reload_policy
from serval.openai.auth import check_api_key
from serval.openai.disconnect import until_disconnect
from serval.openai.errors import APIError
from serval.openai.http import OFF_LOOP_BYTES, json_object, parse_json_body, read_body
from serval.router import metrics as m
from serval.router.config import RouterConfig
from serval.router.gateway import BACKEND_HEADER, RoutedRequest, Router
from serval.router.guarding import RouterGuardSession
from serval.router.responses import RESPONSES_PATH, client_owner, not_found as response_not_found

logger = logging.getLogger("serval.router")

CLIENT_CLOSED = 499  # nginx's status for a client that left before the answer


def build_app(router: Router) -> Starlette:
    async def completions(raw: Request) -> Response:
        return await handle(router, raw, "/v1/completions")

    async def chat_completions(raw: Request) -> Response:
        return await handle(router, raw, "/v1/chat/completions")

    async def create_response(raw: Request) -> Response:
        return await handle(router, raw, RESPONSES_PATH)

    async def stored_response(raw: Request) -> Response:
        return await forward_stored(router, raw)

    async def models(_: Request) -> Response:
        return JSONResponse(model_list(router))

    async def health(_: Request) -> Response:
        return health_response(router)

    async def metrics(_: Request) -> Response:
        return Response(router.metrics.render(), media_type=m.CONTENT_TYPE)

    async def not_found(raw: Request, _exc) -> Response:
        return APIError(404, f"No route {raw.method} {raw.url.path}; the router serves /v1/completions, "
                             "/v1/chat/completions, /v1/responses, /v1/models, /health, /metrics.",
                        type="not_found_error").response()

    async def not_allowed(raw: Request, _exc) -> Response:
        return APIError(405, f"Method {raw.method} is not allowed on {raw.url.path}.").response()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await router.start()
        if router.guard is not None:
            # SIGHUP re-reads the policy; a bad file is logged and the running policy stays
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_policy, router.guard)
        logger.info("routing", extra={"models": router.config.public_names(), "backends": list(router.backends),
                                      "policy": router.guard.policy.source if router.guard is not None else None})
        yield
        await router.stop()

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route(RESPONSES_PATH, create_response, methods=["POST"]),
              Route(RESPONSES_PATH + "/{response_id}", stored_response, methods=["GET", "DELETE"]),
              Route(RESPONSES_PATH + "/{response_id}/input_items", stored_response, methods=["GET"]),
              Route(RESPONSES_PATH + "/{response_id}/cancel", stored_response, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_allowed})
    app.state.router = router
    return app


def model_list(router: Router) -> dict:
    """/v1/models: every group and alias, with the longest context among the group's backends."""
    created = int(time.time())
    cards = []
    for group in router.config.groups.values():
        lengths = [router.backends[name].max_context for name in group.backends]
        known = [length for length in lengths if length is not None]
        for name in (group.name, *group.aliases):
            cards.append({"id": name, "object": "model", "created": created, "owned_by": "serval-router",
                          "root": group.name, "max_model_len": max(known) if known else None,
                          "backends": list(group.backends)})
    return {"object": "list", "data": cards}


def health_response(router: Router) -> Response:
    """200 while any backend can take a request; 503 (with every backend's state) when none can."""
    now = router.clock()
    status = {name: {"healthy": b.healthy, "breaker": b.breaker.current_state(now), "in_flight": b.in_flight}
              for name, b in router.backends.items()}
    if not any(backend.available(now) for backend in router.backends.values()):
        return APIError(503, f"No backend is available: {status}", type="server_error").response()
    return JSONResponse({"status": "ok", "backends": status})


async def handle(router: Router, raw: Request, path: str) -> Response:
    request_id = raw.headers.get("x-request-id") or f"route-{uuid.uuid4().hex}"
    session = RouterGuardSession(router.guard, request_id)
    response = None
    try:
        if router.config.api_keys and not (router.guard is not None and router.guard.requires_keys):
            check_api_key(raw.headers.get("authorization"), router.config.api_keys)  # else the policy's keys decide
        if path == RESPONSES_PATH:
            refuse_responses_under_policy(router)
        body_bytes = await read_body(raw, router.config.max_body_bytes)
        # Large bodies are parsed on a thread, so one of them doesn't hold up every stream the router relays.
        parsed = (await asyncio.to_thread(parse_json_body, body_bytes) if len(body_bytes) > OFF_LOOP_BYTES
                  else parse_json_body(body_bytes))
        body = json_object(parsed)
        if await session.admit(body, raw.headers):
            body_bytes = json.dumps(body).encode()
        request = RoutedRequest(path, body, body_bytes, raw.headers, request_id, router.clock(), session,
                                client_owner(raw.headers.get("authorization"), bool(router.config.api_keys)))
        try:
            response = await until_disconnect(raw, router.route(request))
        finally:
            if not isinstance(response, StreamingResponse):
                session.release()  # a stream's relay releases when it ends
        return response if response is not None else Response(status_code=CLIENT_CLOSED)
    except APIError as error:
        return error.response()
    except Exception:  # noqa: BLE001 - the gateway stays up; the log says what broke, the client is not told
        logger.exception("unexpected error while routing", extra={"request_id": request_id})
        return APIError(500, "The router failed on this request; its log has the details (request id "
                             f"{request_id}).", type="server_error").response()


def refuse_responses_under_policy(router: Router) -> None:
    # The router's rails read chat messages and completion prompts; Responses items would pass them unread.
    if router.guard is not None:
        raise APIError(400, "This router runs a guard policy, whose rails do not read the Responses API's items: "
                            "/v1/responses is refused here. Put the policy on the backends (serval serve --policy) "
                            "to serve it.", param=None, code="unsupported_with_policy")


async def forward_stored(router: Router, raw: Request) -> Response:
    """GET/DELETE /v1/responses/{id} (and input_items, cancel) on the backend that stores the response."""
    response_id = raw.path_params["response_id"]
    try:
        if router.config.api_keys:
            check_api_key(raw.headers.get("authorization"), router.config.api_keys)
        refuse_responses_under_policy(router)
        home = router.response_homes.find(response_id, client_owner(raw.headers.get("authorization"),
                                                                    bool(router.config.api_keys)))
        if home is None:
            raise response_not_found(response_id)
        backend = router.backends[home.backend]
        headers = {"accept-encoding": "identity"}
        if backend.config.api_key:
            headers["authorization"] = f"Bearer {backend.config.api_key}"
        url = backend.config.url + raw.url.path + (f"?{raw.url.query}" if raw.url.query else "")
        try:
            async with router.session.request(raw.method, url, headers=headers) as answer:
                content, status = await answer.read(), answer.status
                content_type = answer.headers.get("content-type")
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            raise APIError(503, f"Backend {backend.name}, which stores response '{response_id}', did not answer "
                                f"({type(error).__name__}); retry later.", type="server_error",
                           code="backend_unavailable") from None
    except APIError as error:
        return error.response()
    if raw.method == "DELETE" and status == 200:
        router.response_homes.forget(response_id)
    return Response(content, status_code=status, media_type=content_type, headers={BACKEND_HEADER: backend.name})


def serve(config: RouterConfig, host: str, port: int, guard=None, access_log: bool = False,
          log_level: str = "info") -> None:
    """Run the gateway until SIGINT/SIGTERM."""
    app = build_app(Router(config, guard=guard))
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=access_log, log_level=log_level,
                timeout_graceful_shutdown=5)
