"""What the router reads from a request body: prompt text, length estimate, session key, needs."""
from serval.router.request_info import route_request


def test_completion_prompt_forms():
    assert route_request({"model": "m", "prompt": "hello world"}, {}).text == "hello world"
    assert route_request({"model": "m", "prompt": ["first", "second"]}, {}).text == "first"
    assert route_request({"model": "m", "prompt": [1, 2, 3]}, {}).text == "1 2 3"
    assert route_request({"model": "m", "prompt": [[4, 5]]}, {}).text == "4 5"
    assert route_request({"model": "m", "prompt": None}, {}).text == ""


def test_chat_text_keeps_message_order_and_detects_modalities():
    body = {"model": "m", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                     {"type": "image_url", "image_url": {"url": "data:..."}}]}],
        "max_completion_tokens": 50, "stream": True}
    request = route_request(body, {})
    assert request.text.startswith("system: be brief\nuser: what is this?")
    assert request.modalities == {"text", "image"} and request.stream and request.max_tokens == 50


def test_estimates_session_key_and_structured_output():
    body = {"model": "m", "prompt": "x" * 400, "max_tokens": 20, "user": "alice",
            "response_format": {"type": "json_object"}}
    request = route_request(body, {})
    assert request.estimated_prompt_tokens == 100 and request.estimated_total_tokens == 120
    assert request.session_key == "alice" and request.needs_structured_output
    assert route_request(body, {"x-session-id": "s1"}).session_key == "s1"  # the header wins
    assert route_request({"model": "m", "prompt": "p", "max_tokens": "many"}, {}).max_tokens is None
