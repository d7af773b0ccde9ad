"""The processes serval starts (tensor-parallel workers, the engine core): where they come from, and how one of them
knows that its driver, the process that started it, still runs.

Where from. A `spawn`ed process is a fresh interpreter that imports torch and serval before it runs (seconds of
CPU). multiprocessing's fork server imports them once and forks each new process from that image: a 2-rank engine
starts in 1.1 s instead of 2.9 s on a 2-core host (benchmarks/process_start_bench.py). The fork server is a
clean interpreter that only imports: it holds no CUDA context (importing torch does not create one; nothing serval
runs at import touches a device), no engine state and no threads of ours, so forking it is safe where forking the
driver is not. A driver's first start also pays the fork server's own imports; each later start is a fork.
Where there is no fork server (not Linux), or when SERVAL_WORKER_MULTIPROC_METHOD=spawn, spawn.

A fork has the fork server's environment, which is the driver's as of the fork server's start; a new_process
takes the driver's as of its own start, as a spawned one does, since the kernels' switches (SERVAL_GEMV,
SERVAL_ATTENTION_BACKEND, ...) are read from it at run time and the driver and its workers must choose alike.

Whose child. A process forked by the fork server is the fork server's child, and the fork server outlives the
driver (each of its children keeps it alive), so os.getppid() says nothing about the driver. The driver's pid does:
DriverWatch opens a pidfd on it (Linux 5.3+), which refers to that process and not to its number, becomes readable
when it exits, and is not fooled by a later process that reuses the pid. (A pipe end only the driver holds would
do as well, but it has to travel to every reader, and any process the driver forks later holds it too and keeps
the children alive.) Without pidfds, os.kill(pid, 0) polls the pid instead.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import select
import time
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Callable

# What the workers and the engine core import, most of it torch and transformers through serval's modules.
SERVAL_PRELOAD = ["serval.engine.core_process", "serval.distributed.worker"]
START_METHOD_ENV = "SERVAL_WORKER_MULTIPROC_METHOD"
_PID_POLL_S = 1.0


def start_context() -> BaseContext:
    """The multiprocessing context serval's processes start from: the fork server, or spawn where there is none or
    SERVAL_WORKER_MULTIPROC_METHOD (vLLM's VLLM_WORKER_MULTIPROC_METHOD) says spawn."""
    method = os.environ.get(START_METHOD_ENV) or \
        ("forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn")
    if method not in ("forkserver", "spawn"):
        raise ValueError(f"{START_METHOD_ENV}={method!r}: use forkserver or spawn (this process's CUDA state and "
                         "threads rule out fork)")
    if method == "spawn":
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(preload_modules())  # taken when the fork server starts: the first start
    return context


def new_process(target: Callable[..., None], args: tuple, name: str, daemon: bool) -> BaseProcess:
    """A process (not started yet) that will run target(*args) in this process's environment as it is now."""
    return start_context().Process(target=_run_in, args=(dict(os.environ), target, args), name=name, daemon=daemon)


def portable_log_formatter() -> logging.Formatter | None:
    """The root handler's formatter (serve's JSON lines) when it can travel to a started process, so that its log
    reads like this one's; None when it can't (a test runner's may not): the process logs in a default format."""
    handlers = logging.getLogger().handlers
    if not handlers or handlers[0].formatter is None:
        return None
    try:
        pickle.dumps(handlers[0].formatter)
    except Exception:  # noqa: BLE001 - any reason it can't travel
        return None
    return handlers[0].formatter


def _run_in(environment: dict[str, str], target: Callable[..., None], args: tuple) -> None:
    os.environ.clear()
    os.environ.update(environment)
    target(*args)


def preload_modules() -> list[str]:
    """What the fork server imports: torch, and serval's modules when it would import this serval.

    Python before 3.12.8 (and 3.13.1) starts the fork server with `python -c` and without this process's sys.path
    (CPython gh-117378), so the working directory comes first on its path. Another serval checkout there would be
    the one preloaded, and every child would run its code; then the children import serval themselves."""
    theirs = os.path.join(os.getcwd(), "serval", "__init__.py")
    ours = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "__init__.py")
    return ["torch", *SERVAL_PRELOAD] if not os.path.exists(theirs) or os.path.samefile(theirs, ours) else ["torch"]


class DriverWatch:
    """Whether the process `pid` (a driver, not necessarily our parent) has exited."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._pidfd: int | None = None
        self._exited = False
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._exited = True
        except (AttributeError, OSError):  # no pidfds on this platform, kernel or sandbox: the pid poll
            pass

    def exited(self, timeout_s: float | None = 0.0) -> bool:
        """Whether the driver has exited, waiting up to timeout_s (None: for as long as it runs) to see it exit."""
        if not self._exited:
            self._exited = self._wait_pidfd(timeout_s) if self._pidfd is not None else self._wait_pid(timeout_s)
        return self._exited

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def _wait_pidfd(self, timeout_s: float | None) -> bool:
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return bool(poller.poll(None if timeout_s is None else timeout_s * 1000))

    def _wait_pid(self, timeout_s: float | None) -> bool:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while _pid_exists(self.pid):
            left_s = _PID_POLL_S if deadline is None else deadline - time.monotonic()
            if left_s <= 0:
                return False
            time.sleep(min(left_s, _PID_POLL_S))
        return True


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True
