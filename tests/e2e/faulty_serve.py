"""`serval serve` with faults that a test triggers by prompt text, for what no well-formed request can cause any
more: an unexpected exception in a handler, and the engine loop dying. Run as
`python -m tests.e2e.faulty_serve serve ARGS` (RemoteServer(..., module="tests.e2e.faulty_serve"))."""
import sys
import threading

from serval import cli
from serval.engine import async_engine
from serval.engine.engine import LLMEngine

INTERNAL_ERROR_MARKER = "RAISE-AN-INTERNAL-ERROR"
KILL_ENGINE_MARKER = "KILL-THE-ENGINE"
# Text that must reach the log and never a client.
SECRET = "secret-internal-detail-4711"

_kill = threading.Event()


class EngineKilled(BaseException):
    """Escapes every `except Exception` in the engine loop, as a fatal fault (a CUDA error, a bug) would."""


_add_request = async_engine.AsyncEngine.add_request
_step = LLMEngine.step


def add_request(self, request_id, prompt, params=None, priority=0):
    text = prompt.get("prompt", "") if isinstance(prompt, dict) else str(prompt)
    if INTERNAL_ERROR_MARKER in text:
        raise RuntimeError(f"{SECRET}: a fault injected by the test")
    if KILL_ENGINE_MARKER in text:
        _kill.set()
    return _add_request(self, request_id, prompt, params, priority)


def step(self):
    if _kill.is_set():
        raise EngineKilled(f"{SECRET}: the engine loop killed by the test")
    return _step(self)


if __name__ == "__main__":
    async_engine.AsyncEngine.add_request = add_request
    LLMEngine.step = step
    sys.exit(cli.main())
