"""`serval route` and `python -m serval.router` import no torch: the gateway starts in a second and runs where torch
is not installed. Each is started for real (config, guard policy, requests routed), stopped with SIGINT (uvicorn
re-raises it after its shutdown; Python still runs exit handlers), and reports at exit whether torch was imported."""
import hashlib
import signal
import subprocess
import sys
import tempfile

import httpx
import pytest
import yaml

from tests.e2e.router_support import ScriptedBackend
from tests.e2e.server import REPO_ROOT, free_port, wait_for_health

KEY = "sk-no-torch"
# Runs the command as its entry point would, and says at exit (after uvicorn's shutdown) what was imported.
LAUNCHERS = {
    "serval route": "import sys; from serval.cli import main; sys.exit(main(['route', *sys.argv[1:]]))",
    "python -m serval.router": "import runpy; runpy.run_module('serval.router', run_name='__main__')",
}
REPORT = ("import atexit, sys; atexit.register(lambda: sys.stdout.write("
          "'torch imported: %s\\n' % ('torch' in sys.modules)))\n")


@pytest.fixture(scope="module")
def backend():
    backend = ScriptedBackend()
    yield backend
    backend.close()


@pytest.mark.parametrize("command", list(LAUNCHERS))
def test_the_router_runs_without_importing_torch(backend, tmp_path, command):
    config, policy = tmp_path / "router.yaml", tmp_path / "policy.yaml"
    config.write_text(yaml.safe_dump({"backends": [{"name": "b", "url": backend.url, "models": ["stub"]}]}))
    policy.write_text(yaml.safe_dump({"keys": [{"id": "k", "sha256": hashlib.sha256(KEY.encode()).hexdigest()}],
                                      "output": {"pii": {"types": ["email"], "action": "redact"}}}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile()
    process = subprocess.Popen([sys.executable, "-c", REPORT + LAUNCHERS[command], "--config", str(config),
                                "--policy", str(policy), "--host", "127.0.0.1", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=log, cwd=REPO_ROOT, text=True)
    try:
        wait_for_health(process, url, 60, command, lambda: _read(log))
        for stream in (False, True):
            response = httpx.post(url + "/v1/completions", json={"model": "stub", "prompt": "p", "stream": stream},
                                  headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
            assert response.status_code == 200 and "tok" in response.text
    finally:
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=30)
    assert out.strip().splitlines()[-1:] == ["torch imported: False"], _read(log)


def _read(log) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")
