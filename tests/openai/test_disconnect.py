"""until_disconnect: the work's result when it finishes first; None, with the work cancelled, when the client goes."""
import asyncio

from starlette.requests import Request

from serval.openai.disconnect import until_disconnect


def request_that_disconnects_after(seconds: float | None) -> Request:
    async def receive():
        if seconds is None:
            await asyncio.Event().wait()  # never disconnects
        await asyncio.sleep(seconds)
        return {"type": "http.disconnect"}
    return Request({"type": "http"}, receive)


def test_result_when_the_work_finishes_first():
    async def work():
        await asyncio.sleep(0.01)
        return "done"
    assert asyncio.run(until_disconnect(request_that_disconnects_after(None), work())) == "done"


def test_disconnect_cancels_the_work_and_returns_none():
    cancelled = []

    async def work():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def run():
        return await asyncio.wait_for(until_disconnect(request_that_disconnects_after(0.01), work()), timeout=5)

    assert asyncio.run(run()) is None
    assert cancelled == [True]
