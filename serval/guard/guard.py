"""Guard: a policy file's rails and keys, shared by all requests of a server or the router. No web framework
inside. Handlers don't call it directly: each request opens a session (serval.guard.session.open_session),
which calls these methods with the request's RequestContext.

    guard = Guard.from_file("policy.yaml")       # PolicyError('FILE:LINE: ...') for a file that can't be used
    reload_policy(guard)                         # SIGHUP: a bad file is logged, the running policy stays
    await guard.aclose()                         # at shutdown

Every decision goes to the audit log (when the policy names one) and to each observer's
`decision(decision, ctx)`; every rail's run time to `latency(rail, seconds, ctx)`.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from serval.guard.audit import AuditLog
from serval.guard.classifier import ClassifierClient
from serval.guard.decisions import Decision, GuardRejection
from serval.guard.keys import KeyStore, Reservation
from serval.guard.output import OutputFilter
from serval.guard.policy import KeyPolicy, Policy, PolicyError, load_policy
from serval.guard.rails import deny_rail, injection_rail, pii_rail

logger = logging.getLogger(__name__)


@dataclass
class RequestContext:
    request_id: str | None = None
    key_id: str | None = None
    trace: Any = None  # an observer's per-request handle (the server puts its OpenTelemetry span here)


class GuardObserver(Protocol):
    def decision(self, decision: Decision, ctx: RequestContext) -> None: ...

    def latency(self, rail: str, seconds: float, ctx: RequestContext) -> None: ...


class Guard:
    def __init__(self, policy: Policy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.keys = KeyStore(policy.keys or (), clock)
        self.audit = AuditLog(policy.audit_path) if policy.audit_path else None
        self.observers: list[GuardObserver] = []
        self.classifier_client = ClassifierClient()
        self._reload_lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str, clock: Callable[[], float] = time.monotonic) -> "Guard":
        """Raises PolicyError ('FILE:LINE: field problem') for a file that can't be used."""
        return cls(load_policy(path), clock)

    def reload(self) -> Policy:
        """Re-read the policy file (SIGHUP). On an error the old policy stays and PolicyError is raised.
        Key usage (budgets, windows, in-flight counts) carries over by key id."""
        with self._reload_lock:
            policy = load_policy(self.policy.source)
            if policy.audit_path != (self.audit.path if self.audit else None):
                old, self.audit = self.audit, AuditLog(policy.audit_path) if policy.audit_path else None
                if old is not None:
                    old.close()
            self.keys.set_keys(policy.keys or ())
            self.policy = policy
            logger.info("policy reloaded", extra={"policy": policy.source,
                                                  "num_keys": len(policy.keys or ())})
            return policy

    @property
    def requires_keys(self) -> bool:
        return self.policy.keys is not None

    # ---- keys and limits ----
    def authenticate(self, authorization: str | None, ctx: RequestContext) -> KeyPolicy | None:
        if not self.requires_keys:
            return None
        try:
            key = self.keys.authenticate(authorization)
        except GuardRejection as rejection:
            self._record(Decision("api_key", "reject", rejection.code), ctx, "input")
            raise
        ctx.key_id = key.id
        return key

    def admit(self, key: KeyPolicy | None, model: str, ctx: RequestContext) -> None:
        if key is None:
            return
        try:
            self.keys.admit(key, model)
        except GuardRejection as rejection:
            self._record(Decision(rejection.rail, "reject", rejection.code), ctx, "input")
            raise

    def reserve(self, key: KeyPolicy | None, tokens: int, ctx: RequestContext) -> Reservation | None:
        """Hold prompt + max_tokens against the key's budget and per-minute limit; GuardRejection 429."""
        if key is None:
            return None
        try:
            return self.keys.reserve(key, tokens)
        except GuardRejection as rejection:
            self._record(Decision(rejection.rail, "reject", rejection.code), ctx, "input")
            raise

    def release(self, key: KeyPolicy | None, prompt_tokens: int, completion_tokens: int,
                reservation: Reservation | None = None) -> None:
        if key is not None:
            self.keys.release(key, prompt_tokens, completion_tokens, reservation)

    async def aclose(self) -> None:
        """Close what the guard holds open (the classifier's HTTP session); call once at shutdown."""
        await self.classifier_client.close()

    # ---- input rails ----
    def check_input(self, texts: list[str], ctx: RequestContext, param: str = "messages",
                    conversation: bool | None = None) -> list[str]:
        """The texts the model may see (PII redacted where the policy says so); GuardRejection 400 if blocked.
        When the texts are one conversation (by default, for param "messages"), deny rules and the injection
        heuristic also read them joined; separate prompts are read one by one."""
        policy = self.policy
        joined = param == "messages" if conversation is None else conversation
        if policy.input_deny:
            self._run("input_deny", lambda: deny_rail(texts, policy.input_deny, param, joined), ctx)
        if policy.injection is not None:
            self._run("injection", lambda: injection_rail(texts, policy.injection, param, joined), ctx)
        if policy.input_pii:
            texts = self._run("input_pii", lambda: pii_rail(texts, policy.input_pii, param), ctx)
        return texts

    @property
    def has_classifier(self) -> bool:
        return self.policy.classifier is not None

    async def classify_input(self, messages: list[dict], ctx: RequestContext, param: str = "messages") -> None:
        """Ask the guard model for a verdict on messages ([{"role", "content"}]); start it beside the main
        request's prefill and await it before sending output. GuardRejection 400 when unsafe and blocking,
        503 when there is no verdict and on_error is block."""
        rule = self.policy.classifier
        if rule is None:
            return
        started = time.perf_counter()
        try:
            verdict, _ = await self.classifier_client.classify(rule, messages)
        except Exception as error:  # noqa: BLE001 - down, timed out or unparsable: the policy says what then
            self._observe_latency("classifier", time.perf_counter() - started, ctx)
            logger.warning("no verdict from the guard model", extra={"url": rule.url, "error": repr(error)})
            action = "block" if rule.on_error == "block" else "allow"
            self._record(Decision("classifier", action, "unavailable"), ctx, "input")
            if rule.on_error == "block":
                raise GuardRejection(503, "The safety classifier is unavailable; try again later.",
                                     "classifier_unavailable", rail="classifier", type="server_error") from error
            return
        self._observe_latency("classifier", time.perf_counter() - started, ctx)
        if verdict.safe:
            return
        category = "unsafe:" + ",".join(verdict.categories) if verdict.categories else "unsafe"
        self._record(Decision("classifier", rule.action, category), ctx, "input")
        if rule.action == "block":
            raise GuardRejection(400, "The request was blocked by the input rail 'classifier': the guard model "
                                      f"judged it unsafe ({', '.join(verdict.categories) or 'no category'}).",
                                 "content_policy_violation", rail="classifier", param=param)

    def check_prompt_tokens(self, num_tokens: int, ctx: RequestContext, param: str = "messages") -> None:
        limit = self.policy.max_prompt_tokens
        if limit is not None and num_tokens > limit:
            self._record(Decision("max_prompt_tokens", "block", "max_prompt_tokens"), ctx, "input")
            raise GuardRejection(400, f"The prompt has {num_tokens} tokens; this server's policy allows at most "
                                      f"{limit} (input.max_prompt_tokens).", "prompt_too_long",
                                 rail="max_prompt_tokens", param=param)

    # ---- output rails ----
    def output_filter(self, ctx: RequestContext) -> OutputFilter | None:
        if not self.policy.has_output_rails:
            return None
        return OutputFilter(self.policy, lambda decision: self._record(decision, ctx, "output"),
                            lambda rail, seconds: self._observe_latency(rail, seconds, ctx))

    # ---- internals ----
    def _run(self, rail: str, check: Callable, ctx: RequestContext):
        """Time one rail and record its decisions, whether it passes or blocks."""
        started = time.perf_counter()
        try:
            result = check()
        except GuardRejection as rejection:
            self._observe_latency(rail, time.perf_counter() - started, ctx)
            for decision in getattr(rejection, "decisions", ()):
                self._record(decision, ctx, "input")
            raise
        self._observe_latency(rail, time.perf_counter() - started, ctx)
        texts, decisions = result if isinstance(result, tuple) else (None, result)
        for decision in decisions:
            self._record(decision, ctx, "input")
        return texts

    def _record(self, decision: Decision, ctx: RequestContext, direction: str) -> None:
        if self.audit is not None:
            self.audit.write(decision, ctx.request_id, ctx.key_id, direction)
        for observer in self.observers:
            observer.decision(decision, ctx)

    def _observe_latency(self, rail: str, seconds: float, ctx: RequestContext) -> None:
        for observer in self.observers:
            observer.latency(rail, seconds, ctx)


def reload_policy(guard: Guard | None) -> None:
    """SIGHUP: re-read the policy; a bad file is logged and the running policy stays."""
    if guard is None:
        logger.warning("SIGHUP ignored: running without --policy")
        return
    try:
        guard.reload()
    except PolicyError as error:
        logger.error("policy reload failed; keeping the running policy", extra={"error": str(error)})
