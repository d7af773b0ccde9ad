"""Reading request bodies: the size limit (declared and streamed) and strict JSON, on real Starlette requests."""
from __future__ import annotations

import asyncio
import json

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from serval.openai.errors import APIError
from serval.openai.http import (MAX_JSON_DEPTH, json_object, lone_surrogate_path, nests_deeper_than,
                                parse_json_body, read_body, read_json_body)

LIMIT = 1000


def _request(chunks: list[bytes], headers: dict[str, str] | None = None) -> tuple[Request, list[int]]:
    """A Starlette request whose body arrives in `chunks`; the list counts the chunks the reader pulled."""
    pulled = []
    messages = [{"type": "http.request", "body": chunk, "more_body": i + 1 < len(chunks)}
                for i, chunk in enumerate(chunks)]

    async def receive():
        pulled.append(1)
        return messages[len(pulled) - 1]

    raw_headers = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {"type": "http", "method": "POST", "path": "/", "headers": raw_headers, "query_string": b""}
    return Request(scope, receive), pulled


def _app() -> TestClient:
    async def echo(request: Request):
        try:
            return JSONResponse({"value": await read_json_body(request, LIMIT)})
        except APIError as error:
            return error.response()
    return TestClient(Starlette(routes=[Route("/", echo, methods=["POST"])]))


def _error(data: bytes) -> APIError:
    with pytest.raises(APIError) as info:
        parse_json_body(data)
    assert info.value.status == 400 and info.value.type == "invalid_request_error"
    return info.value


def test_json_round_trips_through_a_real_app():
    body = {"model": "m", "messages": [{"role": "user", "content": "héllo 😀"}], "temperature": 0.5, "n": 2}
    response = _app().post("/", json=body)
    assert response.status_code == 200 and response.json() == {"value": body}


def test_declared_length_over_the_limit_is_413_with_openais_body():
    response = _app().post("/", content=b"x" * (LIMIT + 1), headers={"content-type": "application/json"})
    assert response.status_code == 413
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and str(LIMIT) in error["message"]


def test_declared_length_is_refused_before_any_byte_is_read():
    request, pulled = _request([b"{}"], {"content-length": str(LIMIT + 1)})
    with pytest.raises(APIError) as info:
        asyncio.run(read_body(request, LIMIT))
    assert info.value.status == 413 and pulled == []


def test_chunked_body_is_cut_off_at_the_limit_without_reading_the_rest():
    chunks = [b"[" + b"1," * 200] + [b"1," * 200] * 50 + [b"1]"]
    request, pulled = _request(chunks)  # no Content-Length: a chunked upload
    with pytest.raises(APIError) as info:
        asyncio.run(read_body(request, LIMIT))
    assert info.value.status == 413 and len(pulled) < len(chunks)


def test_a_body_at_the_limit_is_read_and_cached_for_later_readers():
    data = json.dumps({"prompt": "x" * (LIMIT - 20)}).encode()[:LIMIT]
    data = data[:-2] + b'"}'
    request, _ = _request([data[:300], data[300:]])
    assert asyncio.run(read_json_body(request, LIMIT)) == json.loads(data)
    assert asyncio.run(request.body()) == data


def test_a_large_body_is_parsed_off_the_loop_with_the_same_result():
    data = json.dumps({"prompt": "y" * 400_000}).encode()
    request, _ = _request([data])
    assert asyncio.run(read_json_body(request, 10 ** 6)) == {"prompt": "y" * 400_000}


@pytest.mark.parametrize("data", [b"{", b"", b"{'a': 1}", b"[1,]", b"\xef\xbb\xbf{}", b'{"a": 1} x'])
def test_invalid_json_is_400(data):
    assert "JSON" in _error(data).message or "UTF-8" in _error(data).message


@pytest.mark.parametrize("data", [b'{"a": "\xff"}', b'{"a": "\xed\xa0\x80"}', "{\"a\": 1}".encode("utf-16")])
def test_bytes_that_are_not_utf8_are_400(data):
    assert "UTF-8" in _error(data).message


@pytest.mark.parametrize("data", [b'{"temperature": Infinity}', b'{"t": -Infinity}', b'[NaN]', b'{"t": 1e400}',
                                  b'{"t": -2.5e999}'])
def test_non_finite_numbers_are_400(data):
    assert "finite" in _error(data).message


def test_an_integer_too_long_to_convert_is_400_not_500():
    assert "JSON" in _error(b'{"seed": ' + b"9" * 5000 + b"}").message


def test_huge_finite_numbers_still_parse():
    assert parse_json_body(b'{"a": 1e300, "b": 123456789012345678901234567890}') == {
        "a": 1e300, "b": 123456789012345678901234567890}


def test_nesting_at_the_limit_parses_and_one_deeper_is_400():
    at_limit = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert parse_json_body(at_limit) is not None
    deeper = b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)
    assert "deep" in _error(deeper).message


def test_nesting_past_the_recursion_limit_is_400_not_recursion_error():
    for opener, closer in ((b"[", b"]"), (b'{"a":', b"}")):
        assert "deep" in _error(opener * 100_000 + closer * 100_000).message


def test_brackets_inside_strings_do_not_count_as_nesting():
    text = '[' * 500 + '\\"' + '{' * 500
    assert parse_json_body(json.dumps({"content": text}).encode()) == {"content": text}


@pytest.mark.parametrize("data", [
    b"[" * 200, b"[]" * 10_000, b"[" * 120 + b"[[]]" * 500 + b"]" * 120, b'"[[[[' + b"[" * 300 + b'"',
    b']]]]' + b"[" * 129, b'{"a": "\\"[[[["}'])
def test_depth_check_agrees_with_counting_every_bracket(data):
    depth = deepest = 0
    in_string = escaped = False
    for char in data.decode():
        if in_string:
            in_string, escaped = (in_string, False) if escaped else (char != '"', char == "\\")
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    assert nests_deeper_than(data, MAX_JSON_DEPTH) == (deepest > MAX_JSON_DEPTH)


@pytest.mark.parametrize("data, where", [
    (b'{"model": "\\ud800"}', "model"),
    (b'{"messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": "a\\udfffb"}]}',
     "messages[1].content"),
    (b'{"messages": [{"content": [{"type": "text", "text": "\\ude00"}]}]}', "messages[0].content[0].text"),
    (b'{"prompt": ["fine", "\\ud83d"]}', "prompt[1]"),
    (b'{"logit_bias": {"\\udc00": 1}}', "logit_bias.\\udc00"),
])
def test_lone_surrogates_are_400_naming_where(data, where):
    error = _error(data)
    assert error.param == where and "surrogate" in error.message
    json.dumps(error.body()).encode("utf-8")  # the error itself must be writable


def test_a_lone_surrogate_as_the_whole_body_is_400():
    assert _error(b'"\\ud800"').param is None


def test_surrogate_pairs_are_text_and_pass():
    assert parse_json_body(b'{"content": "\\ud83d\\ude00 \\uD83D\\uDE00"}') == {"content": "😀 😀"}


def test_lone_surrogate_path_is_none_for_clean_values():
    assert lone_surrogate_path({"a": ["b", {"c": "d"}], "e": 1, "f": None}) is None


def test_json_object_names_what_came_instead():
    assert json_object({"a": 1}) == {"a": 1}
    for value, name in (([], "an array"), ("s", "a string"), (None, "null"), (True, "a boolean"), (3, "a number")):
        with pytest.raises(APIError) as info:
            json_object(value)
        assert info.value.status == 400 and name in info.value.message
