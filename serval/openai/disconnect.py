"""Client disconnects while a handler works: the server and the router both stop the work when nobody waits."""
from __future__ import annotations

import asyncio
import contextlib

from starlette.requests import Request


async def until_disconnect(raw: Request, work):
    """Await `work`; if the client disconnects first, cancel it and return None. Cancelling is what frees the work's
    resources (the server's engine requests, the router's backend request). Once a streaming response has been
    returned, Starlette watches the client itself."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled() or not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    return task.result()
