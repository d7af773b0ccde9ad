"""The guard at the gateway: `serval serve`'s policy file (keys, limits, budgets, input and output rails) applied by
the router before it routes, so the rails hold in front of engines that have none.

The decisions are the shared per-request session's (serval.guard.session); what is the router's own is where the
texts live: it reads them out of the client's raw JSON body and writes redactions back, and it rewrites the
backend's answer, a whole JSON body or an SSE stream event by event (one streaming-safe filter per choice). The
router does not tokenize: token counts come from the backends' `usage` (asked for on streams, and removed again
when the client did not ask), the budget reservation and the fallback charge are estimates (characters ÷ 4), and
`input.max_prompt_tokens` is left to the backends.
"""
from __future__ import annotations

import json

from serval.guard.decisions import GuardRejection
from serval.guard.session import ChoiceFilters, open_session
from serval.openai.errors import APIError
from serval.router.request_info import CHARS_PER_TOKEN


class RouterGuardSession:
    """One request's guard session as the router needs it: over the raw body and the backend's raw answer.
    Without a policy the shared session is the null one and every method passes things through."""

    def __init__(self, guard, request_id: str) -> None:
        self.shared = open_session(guard, request_id)
        self.guard = guard
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.usage_seen = False
        self.prompt_chars = 0
        self.completion_chars = 0
        self.client_wants_usage = True
        self.expected_choices = 1  # n x prompts: when all have been stopped by a rail, the stream can end

    @property
    def active(self) -> bool:
        return self.shared.active

    async def admit(self, body: dict, headers) -> bool:
        """Keys, limits, the token reservation and the input rails; raises APIError. True when the body was
        changed (redaction, usage asked for), so it must be serialized again."""
        if not self.active:
            return False
        chat = "messages" in body
        try:
            self.shared.authenticate(headers.get("authorization"))
            model = body.get("model")
            self.shared.admit(model if isinstance(model, str) else "")
            self._measure(body, chat)
            self.shared.reserve(self.prompt_chars // CHARS_PER_TOKEN, self._max_completion_tokens(body))
            changed = self._check_input(body, chat) if self._has_input_rails else False
            if self.shared.has_classifier and chat:
                await self.shared.classify([_text_messages(body["messages"])])
            elif self.shared.has_classifier:
                await self.shared.classify([[{"role": "user", "content": p}] for p in _prompts(body)], "prompt")
        except GuardRejection as rejection:
            self.release()
            raise APIError.from_rejection(rejection) from None
        if body.get("stream") is True and self.shared.key is not None:
            # Budgets are charged in tokens: ask the backend for usage, and strip it again if the client didn't.
            options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
            self.client_wants_usage = bool(options.get("include_usage"))
            if not self.client_wants_usage:
                body["stream_options"] = {**options, "include_usage": True}
                changed = True
        return changed

    @property
    def _has_input_rails(self) -> bool:
        """Whether the input rails must read the texts (a prompt of token ids is refused only then)."""
        policy = self.guard.policy
        return bool(policy.input_deny or policy.injection is not None or policy.input_pii)

    def _measure(self, body: dict, chat: bool) -> None:
        n = body.get("n") if isinstance(body.get("n"), int) and body.get("n") > 0 else 1
        self.expected_choices = n if chat else n * max(1, len(_prompts(body)))
        if chat:
            self.prompt_chars = sum(len(m["content"]) for m in _text_messages(body["messages"]))
        else:
            self.prompt_chars = sum(len(prompt) for prompt in _prompts(body))

    def _max_completion_tokens(self, body: dict) -> int:
        """The most the request may generate, all choices together; 0 when it doesn't say (the backend's default
        then applies, and the usage is settled when the request ends)."""
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            return 0
        return limit * self.expected_choices

    def _check_input(self, body: dict, chat: bool) -> bool:
        slots = _message_slots(body.get("messages")) if chat else _prompt_slots(body)
        texts = [get() for get, _ in slots]
        checked = self.shared.check_input(texts, "messages" if chat else "prompt")
        changed = False
        for (_, put), old, new in zip(slots, texts, checked):
            if new != old:
                put(new)
                changed = True
        return changed

    # ---------------------------------------------------------------- answers
    def filter_whole(self, content: bytes, chat: bool) -> bytes:
        """A non-streamed 200 body: each choice's text through the output rails; usage recorded."""
        if not self.active:
            return content
        try:
            payload = json.loads(content)
        except ValueError:
            return content
        if not isinstance(payload, dict):
            return content
        self.record_usage(payload.get("usage"))
        changed = False
        for choice in payload.get("choices") or []:
            holder, field = (choice.get("message") or {}, "content") if chat else (choice, "text")
            text = holder.get(field)
            if not isinstance(text, str):
                continue
            self.completion_chars += len(text)
            step = self.shared.filter_whole(text)
            holder[field] = step.text
            if step.stopped:
                choice["finish_reason"] = "content_filter"
            changed = changed or step.text != text or step.stopped
        return json.dumps(payload).encode() if changed else content

    def stream_rewriter(self, chat: bool) -> "StreamRewriter | None":
        """None when the stream can pass through untouched."""
        if not self.shared.has_output_rails and (self.shared.key is None or self.client_wants_usage):
            return None
        return StreamRewriter(self, chat)

    def record_usage(self, usage) -> None:
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = usage["completion_tokens"]
            self.usage_seen = True

    def release(self) -> None:
        """Charge the key once; without the backend's usage, charge the estimate (characters ÷ 4)."""
        if not self.usage_seen:
            self.prompt_tokens = self.prompt_chars // CHARS_PER_TOKEN
            self.completion_tokens = -(-self.completion_chars // CHARS_PER_TOKEN)
        self.shared.release(self.prompt_tokens, self.completion_tokens)


class StreamRewriter:
    """Rewrites an OpenAI SSE stream event by event: each choice's text through its own output filter
    (held-back text is released when the choice finishes), `content_filter` when a stop rail fires, usage
    recorded and dropped when only the router asked for it."""

    def __init__(self, session: RouterGuardSession, chat: bool) -> None:
        self.session, self.chat = session, chat
        self.buffer = b""
        self.choices: ChoiceFilters = session.shared.choice_filters(session.expected_choices)

    @property
    def all_stopped(self) -> bool:
        """Every choice was ended by a stop rail: nothing more will be sent, the backend can stop."""
        return self.choices.all_stopped

    def feed(self, data: bytes) -> bytes:
        self.buffer += data
        out = []
        while True:
            end = self.buffer.find(b"\n\n")
            if end < 0:
                break
            event, self.buffer = self.buffer[:end], self.buffer[end + 2:]
            out.append(self._event(event))
        return b"".join(out)

    def end(self) -> bytes:
        """What is left when the backend's stream ends (normally nothing: it ends with [DONE])."""
        rest, self.buffer = self.buffer, b""
        return self._event(rest) if rest.strip() else b""

    def _event(self, event: bytes) -> bytes:
        line = event.strip()
        if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
            return event + b"\n\n"
        try:
            payload = json.loads(line[5:])
        except ValueError:
            return event + b"\n\n"
        if not isinstance(payload, dict):
            return event + b"\n\n"
        if payload.get("usage"):
            self.session.record_usage(payload["usage"])
            if not self.session.client_wants_usage:
                if not payload.get("choices"):
                    return b""
                payload["usage"] = None
        choices = []
        for choice in payload.get("choices") or []:
            index = choice.get("index", 0)
            if self.choices.done(index):
                continue
            choices.append(choice)
            self._filter_choice(index, choice)
        if payload.get("choices") and not choices:
            return b""
        payload["choices"] = choices
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    def _filter_choice(self, index: int, choice: dict) -> None:
        holder, field = (choice.setdefault("delta", {}), "content") if self.chat else (choice, "text")
        text = holder.get(field) or ""
        self.session.completion_chars += len(text)
        step = self.choices.filter(index, text, finished=choice.get("finish_reason") is not None)
        if step.stopped:
            choice["finish_reason"] = "content_filter"
        if text or step.text:
            holder[field] = step.text


def _message_slots(messages) -> list[tuple]:
    """(get, put) for every text the model will read in a chat body, in order."""
    slots = []
    if not isinstance(messages, list):
        return slots
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            slots.append((lambda m=message: m["content"], lambda text, m=message: m.__setitem__("content", text)))
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                    slots.append((lambda p=part: p["text"], lambda text, p=part: p.__setitem__("text", text)))
    return slots


def _prompt_slots(body: dict) -> list[tuple]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [(lambda: body["prompt"], lambda text: body.__setitem__("prompt", text))]
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return [(lambda i=i: body["prompt"][i], lambda text, i=i: body["prompt"].__setitem__(i, text))
                for i in range(len(prompt))]
    if prompt is not None:
        # Token ids: the router has no tokenizer to read them, so the rails could not see them.
        raise GuardRejection(400, "This router applies input rails and has no tokenizer: send the prompt as text, "
                                  "not token ids.", "unsupported_prompt", rail="input", param="prompt")
    return []


def _prompts(body: dict) -> list[str]:
    prompt = body.get("prompt")
    return [prompt] if isinstance(prompt, str) else [p for p in prompt or [] if isinstance(p, str)]


def _text_messages(messages) -> list[dict]:
    out = []
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        out.append({"role": message.get("role", "user"), "content": content if isinstance(content, str) else ""})
    return out
