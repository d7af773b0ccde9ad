"""Where the router sends the Responses API's stored responses: a response lives in the store of the backend that
created it, so `GET`/`DELETE /v1/responses/{id}` (and `/input_items`) and a create with `previous_response_id`
must reach that backend.

The router remembers each response it relayed: id -> (backend, owner), read from the answer (the JSON body's `id`,
or a stream's first event, `response.created`), in a map bounded to MAX_REMEMBERED ids, oldest forgotten first.
The backend-chosen id is relayed unchanged (rewriting ids inside streamed events would cost a parse of every
event). An id the router does not know (created before a router restart, forgotten, or never relayed by it) is
a 404 for a lookup; a continuation from it is routed as any request, and the backend that gets it answers from
its own store (404 `previous_response_not_found` when it is not the one). The owner is the client's API key
(hashed), so one key cannot read or continue another's responses through the router; without router keys,
everyone shares.
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass

from serval.openai.auth import bearer_token
from serval.openai.errors import APIError

RESPONSES_PATH = "/v1/responses"
# ~100 bytes an entry: a few MB at most, and far more ids than a conversation lives through.
MAX_REMEMBERED = 65536
# A stream's first event carries the id; a backend that has not sent it within this many bytes is not read further.
MAX_ID_SCAN_BYTES = 1 << 16


@dataclass
class ResponseHome:
    backend: str
    owner: str


class ResponseHomes:
    """id -> the backend that stores the response, and who created it; the newest MAX_REMEMBERED ids."""

    def __init__(self, capacity: int = MAX_REMEMBERED) -> None:
        self.capacity = capacity
        self._homes: OrderedDict[str, ResponseHome] = OrderedDict()

    def __len__(self) -> int:
        return len(self._homes)

    def remember(self, response_id: str, home: ResponseHome) -> None:
        self._homes[response_id] = home
        self._homes.move_to_end(response_id)
        while len(self._homes) > self.capacity:
            self._homes.popitem(last=False)

    def find(self, response_id: str, owner: str) -> ResponseHome | None:
        """The home of `response_id` when `owner` created it; None when unknown or another's (the same 404)."""
        home = self._homes.get(response_id)
        return home if home is not None and home.owner == owner else None

    def is_known(self, response_id: str) -> bool:
        return response_id in self._homes

    def forget(self, response_id: str) -> None:
        self._homes.pop(response_id, None)


def client_owner(authorization: str | None, keyed: bool) -> str:
    """The router's name for a client: its key, hashed (only the router's own keys count, so `keyed` says whether
    there are any); without keys, one shared owner."""
    token = bearer_token(authorization) if keyed else None
    return "" if token is None else hashlib.sha256(token.encode()).hexdigest()[:32]


def whole_response_id(content: bytes) -> str | None:
    """The `id` of a non-streamed Response body."""
    try:
        payload = json.loads(content)
    except ValueError:
        return None
    response_id = payload.get("id") if isinstance(payload, dict) else None
    return response_id if isinstance(response_id, str) else None


class StreamIdReader:
    """Reads the response id from a relayed stream's first event (`response.created`), without holding up a byte."""

    def __init__(self) -> None:
        self.buffer = b""
        self.response_id: str | None = None
        self.done = False

    def feed(self, chunk: bytes) -> str | None:
        """The id once the first event is whole (returned once), else None."""
        if self.done:
            return None
        self.buffer += chunk
        end = self.buffer.find(b"\n\n")
        if end < 0:
            if len(self.buffer) > MAX_ID_SCAN_BYTES:
                self.done, self.buffer = True, b""
            return None
        self.done = True
        event, self.buffer = self.buffer[:end], b""
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                try:
                    payload = json.loads(line[5:])
                except ValueError:
                    return None
                response = payload.get("response") if isinstance(payload, dict) else None
                response_id = response.get("id") if isinstance(response, dict) else None
                self.response_id = response_id if isinstance(response_id, str) else None
                return self.response_id
        return None


def not_found(response_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"No response found with id '{response_id}'.", param=param, type="invalid_request_error",
                    code="not_found" if param is None else "previous_response_not_found")
