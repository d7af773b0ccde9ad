"""The bearer-key check shared by the server (`--api-key`) and the router (`api_keys`).

It reads the header the way the guard's policy keys do (serval/guard/keys.py: the scheme in any case, spaces
around the key ignored) and answers a missing or wrong key with the same 401 body (type `authentication_error`,
code `invalid_api_key`), so a client sees one behaviour whichever way the keys are configured.
"""
from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from serval.openai.errors import APIError

_SCHEME = "bearer "


def bearer_token(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer KEY` header (`bearer`, `BEARER`, extra spaces: all accepted), or None
    when the header is missing, has another scheme or no key."""
    if not authorization or authorization[:len(_SCHEME)].lower() != _SCHEME:
        return None
    return authorization[len(_SCHEME):].strip() or None


def key_matches(token: str | None, keys: Iterable[str]) -> bool:
    """Whether `token` is one of `keys`, in time that depends on neither (digests of equal length are compared,
    every key is tried), so timing tells an attacker nothing about a near miss."""
    if token is None:
        return False
    digest = _digest(token)
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(digest, _digest(key))
    return matched


def check_api_key(authorization: str | None, keys: Iterable[str]) -> None:
    """Raise the 401 APIError unless the header carries one of `keys`."""
    token = bearer_token(authorization)
    if token is None:
        raise missing_api_key()
    if not key_matches(token, keys):
        raise incorrect_api_key()


def missing_api_key() -> APIError:
    return APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.", type="authentication_error",
                    code="invalid_api_key")


def incorrect_api_key() -> APIError:
    return APIError(401, "Incorrect API key provided.", type="authentication_error", code="invalid_api_key")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
