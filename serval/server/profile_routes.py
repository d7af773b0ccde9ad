"""POST /start_profile and /stop_profile (vLLM's): torch's profiler over the engine while the server serves.

Off unless SERVAL_TORCH_PROFILER_DIR names a directory (vLLM's VLLM_TORCH_PROFILER_DIR): then 404 says how to turn
it on. The engine starts and stops the profiler on its step thread, in this process or in the engine-core process
(serval.engine.profiler); each stop writes one *.pt.trace.json.gz under the directory. Starting twice or stopping
what is not running is answered 400; the server goes on serving either way.
"""
from __future__ import annotations

import asyncio
import logging

from fastapi.responses import PlainTextResponse, Response

from serval.engine.profiler import PROFILER_DIR_ENV, profiler_dir
from serval.openai.errors import APIError
from serval.server.lifecycle import to_api_error
from serval.server.state import ServerState

logger = logging.getLogger(__name__)


async def start_profile(state: ServerState) -> Response:
    try:
        trace_dir = _trace_dir()
        await asyncio.to_thread(state.engine.start_profile, trace_dir)
    except Exception as error:  # noqa: BLE001 - every failure is an OpenAI error body; the server goes on
        return to_api_error(error).response()
    logger.info("profiler started", extra={"trace_dir": trace_dir})
    return PlainTextResponse("Profiler started.")


async def stop_profile(state: ServerState) -> Response:
    try:
        _trace_dir()
        path = await asyncio.to_thread(state.engine.stop_profile)
    except Exception as error:  # noqa: BLE001
        return to_api_error(error).response()
    logger.info("profiler stopped", extra={"trace": path})
    return PlainTextResponse(f"Profiler stopped; trace written to {path}")


def _trace_dir() -> str:
    trace_dir = profiler_dir()
    if trace_dir is None:
        raise APIError(404, f"The profiler is off; start the server with {PROFILER_DIR_ENV} set to the directory "
                            "for its traces.", type="not_found_error")
    return trace_dir
