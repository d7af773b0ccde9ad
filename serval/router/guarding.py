"""The guard at the gateway: `serval serve`'s policy file (keys, limits, budgets, input and output rails)
applied by the router before it routes, so the rails hold in front of engines that have none.

One GuardSession per request: it authenticates and admits the key, runs the input rails (rewriting the body
when PII is redacted), filters the answer (a whole JSON body, or the SSE stream event by event with one
streaming-safe filter per choice) and releases the key with the tokens used, exactly once. The router does not
tokenize: token counts come from the backends' `usage` (asked for on streams, and removed again when the
client did not ask), so `input.max_prompt_tokens` is left to the backends.
"""
from __future__ import annotations

import json

from serval.guard.decisions import GuardRejection
from serval.guard.guard import Guard, RequestContext
from serval.openai.errors import APIError
from serval.router.request_info import CHARS_PER_TOKEN


class GuardObserver:
    """Feeds the router's guard metrics (the same names `serval serve` exports)."""

    def __init__(self, metrics) -> None:
        self.metrics = metrics

    def decision(self, decision, ctx) -> None:
        self.metrics.guard_decisions.labels(decision.rail, decision.action).inc()

    def latency(self, rail: str, seconds: float, ctx) -> None:
        self.metrics.guard_latency.labels(rail).observe(seconds)


class GuardSession:
    def __init__(self, guard: Guard, request_id: str) -> None:
        self.guard = guard
        self.ctx = RequestContext(request_id=request_id)
        self.key = None
        self.admitted = False
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.usage_seen = False
        self.prompt_chars = 0
        self.completion_chars = 0
        self.client_wants_usage = True
        self.expected_choices = 1  # n x prompts: when all have been stopped by a rail, the stream can end

    async def admit(self, body: dict, headers) -> bool:
        """Keys, limits and input rails; raises APIError. True when the body was changed (redaction,
        usage asked for), so it must be serialized again."""
        try:
            self.key = self.guard.authenticate(headers.get("authorization"), self.ctx)
            model = body.get("model")
            self.guard.admit(self.key, model if isinstance(model, str) else "", self.ctx)
            self.admitted = True
            changed = self._check_input(body) if self._has_input_rails else False
            if self.guard.has_classifier and "messages" in body:
                await self.guard.classify_input(_text_messages(body["messages"]), self.ctx)
            elif self.guard.has_classifier:
                await self.guard.classify_input([{"role": "user", "content": p} for p in _prompts(body)], self.ctx,
                                                param="prompt")
        except GuardRejection as rejection:
            self.release()
            raise APIError.from_rejection(rejection) from None
        n = body.get("n") if isinstance(body.get("n"), int) and body.get("n") > 0 else 1
        self.expected_choices = n * max(1, len(_prompts(body))) if "messages" not in body else n
        if "messages" in body:
            self.prompt_chars = sum(len(m["content"]) for m in _text_messages(body["messages"]))
        else:
            self.prompt_chars = sum(len(prompt) for prompt in _prompts(body))
        if body.get("stream") is True and self.key is not None:
            # Budgets are charged in tokens: ask the backend for usage, and strip it again if the client didn't.
            options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
            self.client_wants_usage = bool(options.get("include_usage"))
            if not self.client_wants_usage:
                body["stream_options"] = {**options, "include_usage": True}
                changed = True
        return changed

    @property
    def _has_input_rails(self) -> bool:
        policy = self.guard.policy
        return bool(policy.input_deny or policy.injection is not None or policy.input_pii)

    def _check_input(self, body: dict) -> bool:
        if "messages" in body:
            slots = _message_slots(body.get("messages"))
            param = "messages"
        else:
            slots = _prompt_slots(body)
            param = "prompt"
        texts = [get() for get, _ in slots]
        checked = self.guard.check_input(texts, self.ctx, param=param)
        changed = False
        for (_, put), old, new in zip(slots, texts, checked):
            if new != old:
                put(new)
                changed = True
        return changed

    # ---------------------------------------------------------------- answers
    def filter_whole(self, content: bytes, chat: bool) -> bytes:
        """A non-streamed 200 body: each choice's text through the output rails; usage recorded."""
        try:
            payload = json.loads(content)
        except ValueError:
            return content
        if not isinstance(payload, dict):
            return content
        self._record_usage(payload.get("usage"))
        changed = False
        for choice in payload.get("choices") or []:
            holder, field = (choice.get("message") or {}, "content") if chat else (choice, "text")
            text = holder.get(field)
            if not isinstance(text, str):
                continue
            self.completion_chars += len(text)
            output_filter = self.guard.output_filter(self.ctx)
            if output_filter is None:
                continue
            step = output_filter.filter_all(text)
            holder[field] = step.text
            if step.stopped:
                choice["finish_reason"] = "content_filter"
            changed = changed or step.text != text or step.stopped
        return json.dumps(payload).encode() if changed else content

    def stream_rewriter(self, chat: bool) -> "StreamRewriter | None":
        """None when the stream can pass through untouched."""
        if not self.guard.policy.has_output_rails and (self.key is None or self.client_wants_usage):
            return None
        return StreamRewriter(self, chat)

    def _record_usage(self, usage) -> None:
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = usage["completion_tokens"]
            self.usage_seen = True

    def release(self) -> None:
        """Charge the key once; without the backend's usage, charge the estimate (characters ÷ 4)."""
        if not self.admitted:
            return
        self.admitted = False
        if not self.usage_seen:
            self.prompt_tokens = self.prompt_chars // CHARS_PER_TOKEN
            self.completion_tokens = -(-self.completion_chars // CHARS_PER_TOKEN)
        self.guard.release(self.key, self.prompt_tokens, self.completion_tokens)


class StreamRewriter:
    """Rewrites an OpenAI SSE stream event by event: each choice's text through its own output filter
    (held-back text is released when the choice finishes), `content_filter` when a stop rail fires, usage
    recorded and dropped when only the router asked for it."""

    def __init__(self, session: GuardSession, chat: bool) -> None:
        self.session, self.chat = session, chat
        self.buffer = b""
        self.filters: dict[int, object] = {}
        self.stopped: set[int] = set()

    @property
    def all_stopped(self) -> bool:
        """Every choice was ended by a stop rail: nothing more will be sent, the backend can stop."""
        return len(self.stopped) >= self.session.expected_choices

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
            self.session._record_usage(payload["usage"])
            if not self.session.client_wants_usage:
                if not payload.get("choices"):
                    return b""
                payload["usage"] = None
        choices = []
        for choice in payload.get("choices") or []:
            index = choice.get("index", 0)
            if index in self.stopped:
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
        if index not in self.filters:
            self.filters[index] = self.session.guard.output_filter(self.session.ctx)
        output_filter = self.filters[index]
        if output_filter is None:
            return
        step = output_filter.push(text) if text else None
        out = step.text if step is not None else ""
        if step is not None and step.stopped:
            self.stopped.add(index)
            choice["finish_reason"] = "content_filter"
        elif choice.get("finish_reason") is not None:
            last = output_filter.finish()
            out += last.text
            if last.stopped:
                self.stopped.add(index)
                choice["finish_reason"] = "content_filter"
        if text or out:
            holder[field] = out


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
