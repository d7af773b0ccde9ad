"""The audit log: one JSON line per rail decision (time, request id, key id, rail, action, category), appended
to the file the policy names. The matched text is never written, only its category."""
from __future__ import annotations

import json
import logging
import os
import threading
from datetime import datetime, timezone

from serval.guard.decisions import Decision

logger = logging.getLogger(__name__)


class AuditLog:
    def __init__(self, path: str) -> None:
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        # Line-buffered append: each decision reaches the file when it is made, and concurrent writers (workers,
        # the router) each append whole lines.
        self._file = open(path, "a", buffering=1, encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, decision: Decision, request_id: str | None, key_id: str | None, direction: str) -> None:
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                  "request_id": request_id, "key_id": key_id, "direction": direction, "rail": decision.rail,
                  "action": decision.action, "category": decision.category}
        if decision.score is not None:
            record["score"] = round(decision.score, 3)
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            try:
                self._file.write(line)
            except (OSError, ValueError) as error:  # a full disk must not fail the request
                logger.error("cannot write the audit log", extra={"path": self.path, "error": str(error)})

    def close(self) -> None:
        with self._lock:
            self._file.close()
