"""What a process started by tests/distributed/test_processes.py runs: it reports what it found at its start.

Apart from the test module, and importing nothing of serval, so that what the process holds of serval is what the
fork server preloaded."""
from __future__ import annotations

import os
import sys


def report(results) -> None:
    torch = sys.modules.get("torch")
    results.put({"parent_pid": os.getppid(), "preloaded": sorted(m for m in sys.modules if m.startswith("serval.")),
                 "cuda_initialized": torch is not None and torch.cuda.is_initialized(),
                 "environment": dict(os.environ)})
