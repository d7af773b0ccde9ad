"""Stored responses: SQLite through the standard library, in a file (`--responses-store PATH`, kept across
restarts) or in memory, holding at most `--responses-max-stored` responses (the oldest go first).

Each row is one response with its owner (the key that created it: a key sees only its own, and another's id is
as unknown as a made-up one), its input items, and its context: every item the model saw before its output (the
previous response's context and output, then this input). A continuation reads one row, and a response stays
continuable after its ancestors are evicted or deleted.

All database work runs on the store's own thread, one connection, in order: the event loop never waits on the
disk, and an in-memory database (which lives in its connection) needs exactly one.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    response TEXT NOT NULL,
    input_items TEXT NOT NULL,
    context TEXT NOT NULL
)"""


class ResponseStoreError(ValueError):
    """The store cannot be opened (a path that is not a writable SQLite file)."""


@dataclass
class StoredResponse:
    id: str
    owner: str
    response: dict  # the Response object as the client got it
    input_items: list[dict]  # this request's input, as canonical items
    context: list[dict]  # every item before this response's output

    def continuation(self) -> list[dict]:
        """The items a response that continues this one starts from."""
        return self.context + self.response["output"]


class ResponseStore:
    def __init__(self, path: str | None, max_stored: int) -> None:
        self.path, self.max_stored = path or ":memory:", max_stored
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="serval-responses")
        self.connection: sqlite3.Connection | None = None
        try:
            self.thread.submit(self._open).result()
        except (sqlite3.Error, OSError) as error:
            self.thread.shutdown(wait=False)
            raise ResponseStoreError(f"cannot open the responses store {self.path!r} (--responses-store): "
                                     f"{error}") from error

    def _open(self) -> None:
        self.connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        if self.path != ":memory:":
            self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute(SCHEMA)
        self._evict()  # a smaller --responses-max-stored than the file was written with

    async def _run(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.thread, partial(function, *args))

    # ---- on the store's thread
    def _evict(self) -> None:
        self.connection.execute("DELETE FROM responses WHERE seq IN (SELECT seq FROM responses ORDER BY seq DESC "
                                "LIMIT -1 OFFSET ?)", (self.max_stored,))

    def _put(self, stored: StoredResponse) -> None:
        with self.connection:
            self.connection.execute("BEGIN")
            self.connection.execute(
                "INSERT OR REPLACE INTO responses (id, owner, response, input_items, context) VALUES (?, ?, ?, ?, ?)",
                (stored.id, stored.owner, json.dumps(stored.response), json.dumps(stored.input_items),
                 json.dumps(stored.context)))
            self._evict()

    def _get(self, response_id: str, owner: str) -> StoredResponse | None:
        row = self.connection.execute("SELECT response, input_items, context FROM responses WHERE id = ? AND "
                                      "owner = ?", (response_id, owner)).fetchone()
        if row is None:
            return None
        return StoredResponse(response_id, owner, *(json.loads(column) for column in row))

    def _delete(self, response_id: str, owner: str) -> bool:
        cursor = self.connection.execute("DELETE FROM responses WHERE id = ? AND owner = ?", (response_id, owner))
        return cursor.rowcount > 0

    def _count(self) -> int:
        return self.connection.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    # ---- from the event loop
    async def put(self, stored: StoredResponse) -> None:
        await self._run(self._put, stored)

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        return await self._run(self._get, response_id, owner)

    async def delete(self, response_id: str, owner: str) -> bool:
        return await self._run(self._delete, response_id, owner)

    async def count(self) -> int:
        return await self._run(self._count)

    def close(self) -> None:
        if self.connection is not None:
            self.thread.submit(self.connection.close).result()
            self.connection = None
        self.thread.shutdown(wait=True)
