"""What the router needs to know of a request to route it, read once from the body.

The router never tokenizes (it fronts models with different tokenizers): prompt length is estimated at
CHARS_PER_TOKEN characters per token, OpenAI's rule of thumb for English. The estimate only steers the
choice toward backends whose context fits; the backend's own check stays authoritative, and its
context_length_exceeded answer still triggers the context-window fallback.
"""
from __future__ import annotations

from dataclasses import dataclass, field

CHARS_PER_TOKEN = 4


@dataclass
class RouteRequest:
    model: str
    text: str  # the prompt as text: what prefix caching sees first
    stream: bool = False
    max_tokens: int | None = None
    session_key: str | None = None
    modalities: set[str] = field(default_factory=lambda: {"text"})
    needs_structured_output: bool = False

    @property
    def estimated_prompt_tokens(self) -> int:
        return len(self.text) // CHARS_PER_TOKEN

    @property
    def estimated_total_tokens(self) -> int:
        return self.estimated_prompt_tokens + (self.max_tokens or 0)


def route_request(body: dict, headers, session_header: str = "x-session-id") -> RouteRequest:
    """Build from a request body (a JSON object); fields of the wrong type are treated as absent."""
    modalities = {"text"}
    if "messages" in body:
        text = _messages_text(body.get("messages"), modalities)
    elif "input" in body:  # the Responses API: its items read as messages (a string is one user message)
        text = _responses_text(body, modalities)
    else:
        text = _prompt_text(body.get("prompt"))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", body.get("max_output_tokens")))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        max_tokens = None
    user = body.get("user")
    session_key = headers.get(session_header) or (user if isinstance(user, str) and user else None)
    response_format = body.get("response_format")
    text_config = body.get("text")
    if response_format is None and isinstance(text_config, dict):  # the Responses API's text.format
        response_format = text_config.get("format")
    structured = (isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema")
                  or any(key in body for key in ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
                                                 "structured_outputs")))
    return RouteRequest(model=str(body.get("model") or ""), text=text, stream=body.get("stream") is True,
                        max_tokens=max_tokens, session_key=session_key, modalities=modalities,
                        needs_structured_output=structured)


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, str):
            return first  # a batch of prompts: the first decides
        if isinstance(first, int):
            return " ".join(str(token) for token in prompt)  # token ids: their text is as good a key
        if isinstance(first, list):
            return " ".join(str(token) for token in first)
    return ""


def _responses_text(body: dict, modalities: set[str]) -> str:
    items = body.get("input")
    items = [{"role": "user", "content": items}] if isinstance(items, str) else items
    if not isinstance(items, list):
        return ""
    instructions = body.get("instructions")
    parts = [{"role": "system", "content": instructions}] if isinstance(instructions, str) else []
    for item in items:
        if isinstance(item, dict) and "content" in item:
            content = item["content"]
            if isinstance(content, list):  # input_text parts read as text parts
                content = [{**part, "type": "text"} if isinstance(part, dict) and part.get("type") in
                           ("input_text", "output_text") else part for part in content]
            parts.append({"role": item.get("role", ""), "content": content})
    return _messages_text(parts, modalities)


def _messages_text(messages, modalities: set[str]) -> str:
    if not isinstance(messages, list):
        return ""
    parts = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        parts.append(str(message.get("role", "")) + ": ")
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    continue
                kind = part.get("type")
                if kind == "text":
                    parts.append(str(part.get("text", "")))
                elif kind in ("image_url", "input_image"):
                    modalities.add("image")
                elif kind in ("input_audio", "audio_url"):
                    modalities.add("audio")
                elif kind == "video_url":
                    modalities.add("video")
        parts.append("\n")
    return "".join(parts)
