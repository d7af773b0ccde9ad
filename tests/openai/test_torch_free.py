"""serval.openai never imports torch: the router (and any light client) imports it without the engine."""
import pkgutil
import subprocess
import sys
from pathlib import Path

import serval.openai

REPO = Path(__file__).resolve().parents[2]


def test_no_module_of_serval_openai_imports_torch():
    names = [f"serval.openai.{module.name}" for module in pkgutil.walk_packages(serval.openai.__path__)]
    assert {"serval.openai.sse", "serval.openai.logprobs", "serval.openai.errors"} <= set(names)
    code = ("import importlib, sys\n"
            f"for name in {names!r}: importlib.import_module(name)\n"
            "assert 'torch' not in sys.modules, [m for m in sys.modules if m.startswith('serval')]\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
