"""How serval's processes start and watch their driver (serval.distributed.processes): a new process comes from
the fork server (its parent) with serval's modules already imported, no CUDA, and the environment of the process
that started it, not the fork server's; DriverWatch sees a process exit that is not the watcher's parent, at once,
before the process is reaped."""
from __future__ import annotations

import multiprocessing.forkserver
import os
import subprocess
import sys

import pytest

from serval.distributed.processes import SERVAL_PRELOAD, DriverWatch, new_process, preload_modules, start_context
from tests.distributed.started_process import report

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="the fork server and pidfds are Linux's")
DEADLINE_S = 60.0


def test_a_new_process_is_a_fork_server_child_with_serval_imported_no_cuda_and_our_environment(monkeypatch):
    results = start_context().Queue()
    multiprocessing.forkserver.ensure_running()  # its environment is this process's as of now
    monkeypatch.setenv("SERVAL_SET_AFTER_THE_FORK_SERVER_STARTED", "1")
    monkeypatch.delenv("HOME", raising=False)
    process = new_process(report, (results,), name="report", daemon=True)
    process.start()
    found = results.get(timeout=DEADLINE_S)
    process.join(DEADLINE_S)
    assert process.exitcode == 0
    assert found["parent_pid"] != os.getpid()  # the fork server's: why the workers watch the driver's pid
    assert set(SERVAL_PRELOAD) <= set(found["preloaded"])
    assert not found["cuda_initialized"]  # a fork of a process with CUDA initialised could not use CUDA
    assert found["environment"] == dict(os.environ)


def test_the_fork_server_preloads_serval_only_when_it_would_import_this_serval(tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert preload_modules() == ["torch", *SERVAL_PRELOAD]
    monkeypatch.chdir(tmp_path)  # the fork server would find serval where this process did
    assert preload_modules() == ["torch", *SERVAL_PRELOAD]
    (tmp_path / "serval").mkdir()
    (tmp_path / "serval" / "__init__.py").write_text("")  # another checkout, first on the fork server's path
    assert preload_modules() == ["torch"]


def sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


def test_driver_watch_sees_the_process_exit_before_it_is_reaped():
    process = sleeper()
    watch = DriverWatch(process.pid)
    try:
        assert not watch.exited()
        assert not watch.exited(timeout_s=0.2)
        process.kill()
        assert watch.exited(timeout_s=DEADLINE_S)  # a zombie still has its pid: only a pidfd says it exited
    finally:
        process.kill()
        process.wait()
        watch.close()


def test_driver_watch_without_pidfds_polls_the_pid(monkeypatch):
    def no_pidfds(pid: int) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfds)
    process = sleeper()
    watch = DriverWatch(process.pid)
    try:
        assert not watch.exited(timeout_s=0.2)
        process.kill()
        process.wait()
        assert watch.exited(timeout_s=DEADLINE_S)
    finally:
        process.kill()
        process.wait()


def test_driver_watch_of_a_process_already_gone():
    process = sleeper()
    process.kill()
    process.wait()
    assert DriverWatch(process.pid).exited()


def test_the_start_method_can_be_spawn_and_nothing_else_but_the_fork_server(monkeypatch):
    assert start_context().get_start_method() == "forkserver"
    monkeypatch.setenv("SERVAL_WORKER_MULTIPROC_METHOD", "spawn")
    assert start_context().get_start_method() == "spawn"
    monkeypatch.setenv("SERVAL_WORKER_MULTIPROC_METHOD", "fork")
    with pytest.raises(ValueError, match="SERVAL_WORKER_MULTIPROC_METHOD='fork': use forkserver or spawn"):
        start_context()
