"""How the server stops: on SIGTERM/SIGINT it drains, and if the engine dies it exits non-zero.

Draining: new requests get 503 (with OpenAI's body; /health says 503 too, so load balancers stop sending), the
requests in flight finish, and at `--shutdown-timeout` the ones still running are ended: a stream gets an error
event and `data: [DONE]`, a whole response a 503, each logged. Then uvicorn stops and the process exits 0. The
listening socket stays open during the drain, so a client gets the 503 rather than a refused connection. A second
signal stops at once.

uvicorn's own handling closes the socket first, cuts streams after a fixed grace without an event, and re-raises
the signal after shutdown (exit status 143); DrainingServer replaces it.
"""
from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn

from serval.openai.errors import APIError
from serval.server.state import ServerState

logger = logging.getLogger(__name__)

# How often the watchdog looks at the engine: a dead engine is noticed within this.
WATCHDOG_INTERVAL_S = 0.5
# Once the engine is found dead, how long the server stays up answering 503 (/health and new requests) before it
# exits: a load balancer's probe and the clients see why, instead of a refused connection.
DEAD_ENGINE_GRACE_S = 2.0
# After the deadline, how long the interrupted requests get to send their error events.
INTERRUPT_GRACE_S = 2.0
# uvicorn's own wait for connections once the drain is done; only idle keep-alive connections remain by then.
UVICORN_GRACE_S = 3


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.state = state
        self.shutdown_timeout = shutdown_timeout
        self.exit_code = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.drain_requested = False
        self.tasks: list[asyncio.Task] = []

    def started_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """From the app's startup: the loop to drain on, and the engine watchdog."""
        self.loop = loop
        self.tasks.append(loop.create_task(self.watch_engine()))

    def handle_exit(self, sig: int, frame) -> None:
        # A signal handler in the main thread, between two bytecodes of the event loop: only schedule work here.
        if self.drain_requested or self.loop is None:
            if self.drain_requested:
                logger.warning("second signal: stopping without waiting for the drain")
                self.exit_code = 1
                self.force_exit = True
            self.should_exit = True
            return
        self.drain_requested = True
        self.loop.call_soon_threadsafe(self._start_drain, signal.Signals(sig).name)

    def _start_drain(self, signal_name: str) -> None:
        self.tasks.append(asyncio.ensure_future(self.drain(signal_name)))

    async def drain(self, signal_name: str) -> None:
        state = self.state
        state.draining = True
        loop = asyncio.get_running_loop()
        started = loop.time()
        logger.info("draining", extra={"signal": signal_name, "requests_in_flight": state.num_in_flight,
                                       "shutdown_timeout_s": self.shutdown_timeout})
        interrupted = 0
        try:
            await asyncio.wait_for(state.idle.wait(), self.shutdown_timeout)
        except TimeoutError:
            interrupted = self.interrupt_all()
            try:
                await asyncio.wait_for(state.idle.wait(), INTERRUPT_GRACE_S)
            except TimeoutError:
                logger.warning("requests still open after their interruption",
                               extra={"requests_in_flight": state.num_in_flight})
        logger.info("drained", extra={"seconds": round(loop.time() - started, 3), "interrupted": interrupted})
        self.should_exit = True

    def interrupt_all(self) -> int:
        """End every request still running: its reader gets a 503 in place of the next output."""
        fan_ins = list(self.state.open_fan_ins)
        for fan_in in fan_ins:
            logger.warning("request ended at the shutdown deadline",
                           extra={"request_id": fan_in.record.request_id, "shutdown_timeout_s": self.shutdown_timeout})
            fan_in.interrupt(APIError.unavailable(
                f"The server shut down before this response finished (--shutdown-timeout {self.shutdown_timeout:g}"
                " s); retry on another replica."))
        return len(fan_ins)

    async def watch_engine(self) -> None:
        """A dead engine cannot come back: exit non-zero so that a supervisor starts a fresh process."""
        engine = self.state.engine
        while not self.should_exit:
            if engine.is_dead:
                logger.error("the engine has stopped; exiting so that the server is restarted",
                             extra={"error": repr(engine.errored), "exit_in_s": DEAD_ENGINE_GRACE_S})
                self.exit_code = 1
                await asyncio.sleep(DEAD_ENGINE_GRACE_S)
                self.should_exit = True
                return
            await asyncio.sleep(WATCHDOG_INTERVAL_S)

    async def stopped(self) -> None:
        """From the app's shutdown."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
