"""The responses store on real SQLite: owners, deletion, oldest-first eviction, a file kept across reopening,
and a path that cannot be opened."""
from __future__ import annotations

import asyncio
import sqlite3

import pytest

from serval.server.response_store import ResponseStore, ResponseStoreError, StoredResponse


def stored(response_id: str, owner: str = "key:a", text: str = "answer") -> StoredResponse:
    output = [{"id": f"msg-{response_id}", "type": "message", "role": "assistant", "status": "completed",
               "content": [{"type": "output_text", "text": text, "annotations": []}]}]
    user = {"id": f"in-{response_id}", "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "q"}]}
    return StoredResponse(response_id, owner, {"id": response_id, "output": output}, [user], [user])


def run(coroutine):
    return asyncio.run(coroutine)


def test_owners_see_only_their_own_and_delete_removes():
    store = ResponseStore(None, max_stored=10)
    try:
        run(store.put(stored("r1", "key:a")))
        assert run(store.get("r1", "key:a")) == stored("r1", "key:a")
        assert run(store.get("r1", "key:b")) is None and run(store.get("r2", "key:a")) is None
        assert not run(store.delete("r1", "key:b"))
        assert run(store.delete("r1", "key:a")) and run(store.get("r1", "key:a")) is None
        assert not run(store.delete("r1", "key:a"))
    finally:
        store.close()


def test_continuation_is_context_then_output():
    record = stored("r1")
    assert record.continuation() == record.context + record.response["output"]


def test_oldest_are_evicted_first():
    store = ResponseStore(None, max_stored=3)
    try:
        for n in range(5):
            run(store.put(stored(f"r{n}")))
        assert run(store.count()) == 3
        assert [run(store.get(f"r{n}", "key:a")) is not None for n in range(5)] == [False, False, True, True, True]
    finally:
        store.close()


def test_a_file_keeps_responses_across_reopening_and_a_smaller_bound_evicts(tmp_path):
    path = str(tmp_path / "store.sqlite")
    store = ResponseStore(path, max_stored=10)
    for n in range(4):
        run(store.put(stored(f"r{n}", text=f"answer {n}")))
    store.close()
    reopened = ResponseStore(path, max_stored=2)
    try:
        assert run(reopened.count()) == 2
        assert run(reopened.get("r3", "key:a")) == stored("r3", text="answer 3")
        assert run(reopened.get("r1", "key:a")) is None
    finally:
        reopened.close()
    with sqlite3.connect(path) as connection:  # a real SQLite file
        assert connection.execute("SELECT COUNT(*) FROM responses").fetchone() == (2,)


def test_a_path_that_cannot_be_opened_names_the_flag(tmp_path):
    with pytest.raises(ResponseStoreError, match="--responses-store"):
        ResponseStore(str(tmp_path / "missing-dir" / "store.sqlite"), max_stored=10)
    not_sqlite = tmp_path / "text.sqlite"
    not_sqlite.write_text("this is not a database " * 100)
    with pytest.raises(ResponseStoreError, match="--responses-store"):
        ResponseStore(str(not_sqlite), max_stored=10)


def test_concurrent_puts_from_the_event_loop_all_land():
    store = ResponseStore(None, max_stored=100)

    async def many():
        await asyncio.gather(*(store.put(stored(f"r{n}")) for n in range(20)))
        return await store.count()

    try:
        assert run(many()) == 20
    finally:
        store.close()
