"""The bearer-key check: the header forms the guard's policy keys accept, and one 401 body for both."""
from __future__ import annotations

import pytest

from serval.guard.decisions import GuardRejection
from serval.guard.keys import KeyStore, hash_key
from serval.guard.policy import KeyPolicy
from serval.openai.auth import (bearer_token, check_api_key, incorrect_api_key, key_matches, missing_api_key)
from serval.openai.errors import APIError

KEY = "sk-test-123"


@pytest.mark.parametrize("header", [f"Bearer {KEY}", f"bearer {KEY}", f"BEARER {KEY}", f"Bearer  {KEY}",
                                    f"Bearer {KEY}  ", f"bEaReR   {KEY} "])
def test_bearer_forms_the_policy_keys_accept(header):
    assert bearer_token(header) == KEY
    store = KeyStore((KeyPolicy(id="k", sha256=hash_key(KEY)),))
    assert store.authenticate(header).id == "k"  # the guard agrees on every form
    check_api_key(header, [KEY])


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Bearer    ", f"Basic {KEY}", KEY,
                                    f"Bearer-{KEY}", f"Token {KEY}"])
def test_headers_without_a_bearer_key(header):
    assert bearer_token(header) is None
    with pytest.raises(APIError) as info:
        check_api_key(header, [KEY])
    assert info.value.body()["error"] == missing_api_key().body()["error"]


@pytest.mark.parametrize("token", [KEY + "x", KEY[:-1], "", "SK-TEST-123", KEY + "\u00e9", "é" * 11])
def test_wrong_keys_do_not_match(token):
    assert not key_matches(token, [KEY, "other"])


def test_any_of_several_keys_matches_and_none_match_nothing():
    assert key_matches("b", ["a", "b", "c"]) and key_matches("a", ("a",))
    assert not key_matches("a", []) and not key_matches(None, ["a"])
    assert key_matches("ключ", ["ключ"])  # non-ASCII keys compare too (hmac.compare_digest refuses non-ASCII str)


def test_a_wrong_key_is_401_with_the_policy_keys_type_and_code():
    with pytest.raises(APIError) as info:
        check_api_key("Bearer nope", [KEY])
    error = info.value
    assert error.status == 401 and error.body()["error"] == incorrect_api_key().body()["error"]
    store = KeyStore((KeyPolicy(id="k", sha256=hash_key(KEY)),))
    for header, ours in (("Bearer nope", incorrect_api_key()), (None, missing_api_key())):
        with pytest.raises(GuardRejection) as rejected:
            store.authenticate(header)
        policy = APIError.from_rejection(rejected.value)
        assert (policy.status, policy.type, policy.code, policy.message) == (ours.status, ours.type, ours.code,
                                                                             ours.message)
