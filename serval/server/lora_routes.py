"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's): change the served LoRA adapters while serving.

Off unless the server runs with --allow-runtime-lora-updating (or SERVAL_ALLOW_RUNTIME_LORA_UPDATING=true, as
vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING). Behind the API key like every route; with a guard policy, the key must
be allowed the adapter's name as a model. Loading reads and checks the adapter on a worker thread, so the engine
keeps stepping and the event loop keeps serving; a bad adapter is answered 400 with what is wrong. Unloading takes
the name away at once (new requests for it get 404) and lets requests already running with it finish.
"""
from __future__ import annotations

import asyncio
import logging

from fastapi import Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict

from serval.guard.session import open_session
from serval.openai.errors import APIError
from serval.openai.protocol import random_id
from serval.server.lifecycle import read_request, to_api_error
from serval.server.state import ServerState

logger = logging.getLogger(__name__)


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: int | None = None  # vLLM's body carries it; the name decides here


async def load_lora_adapter(state: ServerState, raw: Request) -> Response:
    try:
        _check_enabled(state)
        body = await read_request(state, raw, LoadLoRAAdapterRequest)
        _admit(state, raw, body.lora_name)
        request = state.loras.new_request(body.lora_name, body.lora_path)
        await asyncio.to_thread(state.engine.add_lora, request)
        state.loras.register(request)  # checks the name again: another load may have taken it meanwhile
    except Exception as error:  # noqa: BLE001 - every failure is an OpenAI error body; the server goes on
        return to_api_error(error).response()
    logger.info("lora adapter loaded", extra={"lora_name": request.lora_name, "lora_path": request.lora_path,
                                              "lora_int_id": request.lora_int_id})
    return PlainTextResponse(f"Success: LoRA adapter '{request.lora_name}' added successfully.")


async def unload_lora_adapter(state: ServerState, raw: Request) -> Response:
    try:
        _check_enabled(state)
        body = await read_request(state, raw, UnloadLoRAAdapterRequest)
        _admit(state, raw, body.lora_name)
        request = state.loras.remove(body.lora_name)
        state.engine.remove_lora(request.lora_int_id)
    except Exception as error:  # noqa: BLE001
        return to_api_error(error).response()
    logger.info("lora adapter unloaded", extra={"lora_name": request.lora_name, "lora_int_id": request.lora_int_id})
    return PlainTextResponse(f"Success: LoRA adapter '{request.lora_name}' removed successfully.")


def _check_enabled(state: ServerState) -> None:
    if not state.config.allow_runtime_lora_updating:
        raise APIError(404, "Loading and unloading LoRA adapters at run time is off; start the server with "
                            "--allow-runtime-lora-updating (and --enable-lora).", type="not_found_error")
    if not state.engine.config.enable_lora:
        raise APIError(400, "This server runs without LoRA; start it with --enable-lora.", param="lora_name")


def _admit(state: ServerState, raw: Request, lora_name: str) -> None:
    """The guard's model list for the key: a key may manage only the adapters it may use."""
    if state.guard is None:
        return
    session = open_session(state.guard, random_id("lora"))
    session.use_key(raw.scope.get("state", {}).get("guard_key"))
    session.admit(lora_name)
    session.release(0, 0)
