"""Whose fault a backend's error answer is: the request's (relayed, not retried, not counted) or the backend's."""
import json

import pytest

from serval.router.failures import error_fields, request_at_fault


def body(type_=None, code=None) -> bytes:
    return json.dumps({"error": {"message": "m", "type": type_, "param": None, "code": code}}).encode()


@pytest.mark.parametrize("status, content, at_fault", [
    (400, body("invalid_request_error"), True),
    (404, b"not json at all", True),  # any 4xx: the request asked for something this backend refuses
    (422, body(), True),
    (429, body("rate_limit_error"), False),  # busy, not the request
    (500, body("invalid_request_error"), True),  # a validation error that escaped as a 500
    (500, body("BadRequestError"), True),  # vLLM names types after its exceptions
    (500, body("server_error", code="invalid_value"), True),
    (500, body("server_error", code="request_failed"), True),  # serval serve: an engine step raised on it
    (500, body("server_error"), False),
    (500, body("InternalServerError"), False),
    (502, b"<html>bad gateway</html>", False),  # a proxy's page: no OpenAI body, the backend's fault
    (503, body("server_error"), False),
])
def test_request_at_fault(status, content, at_fault):
    assert request_at_fault(status, content) is at_fault


def test_error_fields_of_what_is_not_an_error_body():
    assert error_fields(b"[1, 2]") == {} and error_fields(b'{"error": "text"}') == {}
    assert error_fields(b"\xff") == {} and error_fields(body(code="c"))["code"] == "c"
