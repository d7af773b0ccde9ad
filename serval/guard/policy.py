"""The policy file: YAML → a validated, frozen Policy. Every error names the file, the line and the field.

```yaml
keys:                              # omit for no key checks (then --api-key, if given, applies)
  - id: team-a                     # what metrics and the audit log call the key
    sha256: 9f86d08...             # hex SHA-256 of the key (python -m serval.guard.keys hash KEY)
    models: [llama]                # allowed served model names (omit: all)
    requests_per_minute: 60
    tokens_per_minute: 20000       # prompt + completion tokens
    token_budget: 1000000          # total tokens, ever
    max_concurrent_requests: 4
input:
  max_prompt_tokens: 4096
  deny: [{name: weapons, pattern: "build a (bomb|weapon)", action: block}]   # block | log
  pii: {action: redact, types: [email, phone, credit_card, iban, ssn, ip_address, secret]}  # block|redact|log
  # or one action per type:  pii: [{types: [secret, credit_card], action: block}, {types: [email], action: redact}]
  injection: {action: block, threshold: 0.5}                                 # block | log
  classifier: {url: "http://127.0.0.1:8001/v1", model: llama-guard, action: block}  # a guard model's server
output:
  deny: [{name: profanity, pattern: "darn", action: redact}]                 # redact | stop | log
  pii: {action: redact}                                                      # redact | stop | log
audit:
  path: /var/log/serval/audit.jsonl
```
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import regex
import yaml

from serval.guard.normalize import normalize_pattern
from serval.guard.pii import PII_TYPES

INPUT_PII_ACTIONS = ("block", "redact", "log")
INPUT_DENY_ACTIONS = ("block", "log")
INJECTION_ACTIONS = ("block", "log")
CLASSIFIER_ACTIONS = ("block", "log")
CLASSIFIER_ON_ERROR = ("block", "allow")
OUTPUT_ACTIONS = ("redact", "stop", "log")


class PolicyError(ValueError):
    """A policy file that can't be used; the message starts with 'FILE:LINE:'."""


@dataclass(frozen=True)
class KeyPolicy:
    id: str
    sha256: str
    models: tuple[str, ...] | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    token_budget: int | None = None
    max_concurrent_requests: int | None = None


@dataclass(frozen=True)
class DenyRule:
    name: str
    pattern: str
    action: str
    compiled: regex.Pattern = field(compare=False, repr=False)


@dataclass(frozen=True)
class PiiRule:
    action: str
    types: tuple[str, ...] = PII_TYPES


@dataclass(frozen=True)
class InjectionRule:
    action: str = "block"
    threshold: float = 0.5


@dataclass(frozen=True)
class ClassifierRule:
    url: str                      # the guard model's server, e.g. http://127.0.0.1:8001/v1
    model: str
    action: str = "block"
    timeout_seconds: float = 10.0
    api_key: str | None = None
    on_error: str = "block"       # no verdict (down, timeout, bad answer): block (503) or allow


@dataclass(frozen=True)
class Policy:
    source: str = "<default>"
    keys: tuple[KeyPolicy, ...] | None = None
    max_prompt_tokens: int | None = None
    input_deny: tuple[DenyRule, ...] = ()
    input_pii: tuple[PiiRule, ...] = ()  # each PII type in at most one rule
    injection: InjectionRule | None = None
    classifier: ClassifierRule | None = None
    output_deny: tuple[DenyRule, ...] = ()
    output_pii: tuple[PiiRule, ...] = ()
    audit_path: str | None = None

    @property
    def has_output_rails(self) -> bool:
        return bool(self.output_deny) or bool(self.output_pii)


def load_policy(path: str) -> Policy:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as error:
        raise PolicyError(f"{path}: cannot read the policy file: {error.strerror}") from error
    return parse_policy(text, path)


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise PolicyError(f"{source}:{line}: not valid YAML: {error.problem or error}") from error
    if node is None:
        return Policy(source=source)
    reader = _Reader(source)
    top = reader.mapping(node, "policy", {"keys", "input", "output", "audit", "version"})
    keys = None
    if "keys" in top:
        keys = tuple(_key(reader, item, f"keys[{i}]") for i, item in enumerate(reader.sequence(top["keys"], "keys")))
        _unique_keys(reader, keys, top["keys"])
    policy = Policy(source=source, keys=keys)
    if "input" in top:
        policy = _input(reader, top["input"], policy)
    if "output" in top:
        policy = _output(reader, top["output"], policy)
    if "audit" in top:
        audit = reader.mapping(top["audit"], "audit", {"path"})
        path = reader.string(audit["path"], "audit.path") if "path" in audit else None
        if path is not None and not os.path.isabs(path) and source not in ("<policy>", "<default>"):
            path = os.path.join(os.path.dirname(os.path.abspath(source)), path)
        policy = dataclasses.replace(policy, audit_path=path)
    return policy


def _key(reader: "_Reader", node, where: str) -> KeyPolicy:
    fields = reader.mapping(node, where, {"id", "sha256", "models", "requests_per_minute", "tokens_per_minute",
                                          "token_budget", "max_concurrent_requests"}, required=("id", "sha256"))
    # The raw scalar: an unquoted digest of digits alone would otherwise resolve to an integer.
    reader.scalar(fields["sha256"], f"{where}.sha256")
    digest = fields["sha256"].value.lower()
    if not regex.fullmatch(r"[0-9a-f]{64}", digest):
        reader.fail(fields["sha256"], f"{where}.sha256", "is not a hex SHA-256 digest (64 hex digits); store "
                    "keys hashed: python -m serval.guard.keys hash KEY")
    models = None
    if "models" in fields:
        models = tuple(reader.string(m, f"{where}.models[{i}]")
                       for i, m in enumerate(reader.sequence(fields["models"], f"{where}.models")))
    limits = {name: reader.positive_int(fields[name], f"{where}.{name}")
              for name in ("requests_per_minute", "tokens_per_minute", "token_budget", "max_concurrent_requests")
              if name in fields}
    return KeyPolicy(id=reader.string(fields["id"], f"{where}.id"), sha256=digest, models=models, **limits)


def _unique_keys(reader: "_Reader", keys: tuple[KeyPolicy, ...], node) -> None:
    seen_ids, seen_hashes = set(), set()
    for key, item in zip(keys, node.value):
        if key.id in seen_ids or key.sha256 in seen_hashes:
            reader.fail(item, "keys", f"key {key.id!r} repeats an id or a sha256 of an earlier key")
        seen_ids.add(key.id)
        seen_hashes.add(key.sha256)


def _input(reader: "_Reader", node, policy: Policy) -> Policy:
    fields = reader.mapping(node, "input", {"max_prompt_tokens", "deny", "pii", "injection", "classifier"})
    changes = {}
    if "max_prompt_tokens" in fields:
        changes["max_prompt_tokens"] = reader.positive_int(fields["max_prompt_tokens"], "input.max_prompt_tokens")
    if "deny" in fields:
        changes["input_deny"] = _deny_rules(reader, fields["deny"], "input.deny", INPUT_DENY_ACTIONS, "block")
    if "pii" in fields:
        changes["input_pii"] = _pii(reader, fields["pii"], "input.pii", INPUT_PII_ACTIONS, "redact")
    if "injection" in fields:
        rule = reader.mapping(fields["injection"], "input.injection", {"action", "threshold"})
        action = reader.choice(rule["action"], "input.injection.action", INJECTION_ACTIONS) \
            if "action" in rule else "block"
        threshold = 0.5
        if "threshold" in rule:
            threshold = reader.number(rule["threshold"], "input.injection.threshold")
            if not 0.0 < threshold <= 1.0:
                reader.fail(rule["threshold"], "input.injection.threshold", f"is {threshold}; allowed (0, 1]")
        changes["injection"] = InjectionRule(action, threshold)
    if "classifier" in fields:
        changes["classifier"] = _classifier(reader, fields["classifier"])
    return dataclasses.replace(policy, **changes)


def _classifier(reader: "_Reader", node) -> ClassifierRule:
    where = "input.classifier"
    fields = reader.mapping(node, where, {"url", "model", "action", "timeout_seconds", "api_key", "on_error"},
                            required=("url", "model"))
    url = reader.string(fields["url"], f"{where}.url")
    if not regex.match(r"https?://", url):
        reader.fail(fields["url"], f"{where}.url", f"is {url!r}; allowed an http:// or https:// URL of a /v1 API")
    rule = ClassifierRule(url, reader.string(fields["model"], f"{where}.model"))
    changes = {}
    if "action" in fields:
        changes["action"] = reader.choice(fields["action"], f"{where}.action", CLASSIFIER_ACTIONS)
    if "on_error" in fields:
        changes["on_error"] = reader.choice(fields["on_error"], f"{where}.on_error", CLASSIFIER_ON_ERROR)
    if "api_key" in fields:
        changes["api_key"] = reader.string(fields["api_key"], f"{where}.api_key")
    if "timeout_seconds" in fields:
        timeout = reader.number(fields["timeout_seconds"], f"{where}.timeout_seconds")
        if timeout <= 0:
            reader.fail(fields["timeout_seconds"], f"{where}.timeout_seconds", f"is {timeout}; allowed > 0")
        changes["timeout_seconds"] = timeout
    return dataclasses.replace(rule, **changes)


def _output(reader: "_Reader", node, policy: Policy) -> Policy:
    fields = reader.mapping(node, "output", {"deny", "pii"})
    changes = {}
    if "deny" in fields:
        changes["output_deny"] = _deny_rules(reader, fields["deny"], "output.deny", OUTPUT_ACTIONS, "stop")
    if "pii" in fields:
        changes["output_pii"] = _pii(reader, fields["pii"], "output.pii", OUTPUT_ACTIONS, "redact")
    return dataclasses.replace(policy, **changes)


def _deny_rules(reader: "_Reader", node, where: str, actions: tuple[str, ...], default: str) -> tuple[DenyRule, ...]:
    rules = []
    for i, item in enumerate(reader.sequence(node, where)):
        here = f"{where}[{i}]"
        fields = reader.mapping(item, here, {"name", "pattern", "action"}, required=("name", "pattern"))
        pattern = reader.string(fields["pattern"], f"{here}.pattern")
        try:
            # Rules match normalised text (serval.guard.normalize), so the pattern's own letters are normalised too.
            compiled = regex.compile(normalize_pattern(pattern), regex.IGNORECASE)
        except regex.error as error:
            reader.fail(fields["pattern"], f"{here}.pattern", f"is not a valid regular expression: {error}")
        action = reader.choice(fields["action"], f"{here}.action", actions) if "action" in fields else default
        rules.append(DenyRule(reader.string(fields["name"], f"{here}.name"), pattern, action, compiled))
    return tuple(rules)


def _pii(reader: "_Reader", node, where: str, actions: tuple[str, ...], default: str) -> tuple[PiiRule, ...]:
    """One rule ({action, types}) or a list of them, so that secrets can be blocked while emails are redacted."""
    if not isinstance(node, yaml.SequenceNode):
        return (_pii_rule(reader, node, where, actions, default),)
    rules, seen = [], set()
    for i, item in enumerate(node.value):
        rule = _pii_rule(reader, item, f"{where}[{i}]", actions, default)
        repeated = seen.intersection(rule.types)
        if repeated:
            reader.fail(item, f"{where}[{i}].types", f"repeats {sorted(repeated)} from an earlier rule; give each "
                        "PII type one action")
        seen.update(rule.types)
        rules.append(rule)
    return tuple(rules)


def _pii_rule(reader: "_Reader", node, where: str, actions: tuple[str, ...], default: str) -> PiiRule:
    fields = reader.mapping(node, where, {"action", "types"})
    action = reader.choice(fields["action"], f"{where}.action", actions) if "action" in fields else default
    types = PII_TYPES
    if "types" in fields:
        types = tuple(reader.choice(t, f"{where}.types[{i}]", PII_TYPES)
                      for i, t in enumerate(reader.sequence(fields["types"], f"{where}.types")))
    return PiiRule(action, types)


class _Reader:
    """Reads composed YAML nodes, failing with the node's line."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, node, where: str, problem: str):
        raise PolicyError(f"{self.source}:{node.start_mark.line + 1}: {where} {problem}")

    def mapping(self, node, where: str, allowed: set[str], required: tuple[str, ...] = ()) -> dict:
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, where, f"must be a mapping with keys among {sorted(allowed)}")
        fields = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key not in allowed:
                self.fail(key_node, f"{where}.{key}", f"is not a known field; allowed: {', '.join(sorted(allowed))}")
            if key in fields:
                self.fail(key_node, f"{where}.{key}", "is given twice")
            fields[key] = value_node
        for name in required:
            if name not in fields:
                self.fail(node, where, f"needs the field {name!r}")
        return fields

    def sequence(self, node, where: str) -> list:
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, where, "must be a list")
        return node.value

    def scalar(self, node, where: str):
        if not isinstance(node, yaml.ScalarNode):
            self.fail(node, where, "must be a single value")
        return yaml.SafeLoader(" ").construct_object(node)

    def string(self, node, where: str) -> str:
        value = self.scalar(node, where)
        if not isinstance(value, str) or not value:
            self.fail(node, where, f"is {value!r}; allowed a non-empty string")
        return value

    def positive_int(self, node, where: str) -> int:
        value = self.scalar(node, where)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            self.fail(node, where, f"is {value!r}; allowed an integer >= 1")
        return value

    def number(self, node, where: str) -> float:
        value = self.scalar(node, where)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            self.fail(node, where, f"is {value!r}; allowed a number")
        return float(value)

    def choice(self, node, where: str, allowed: tuple[str, ...]) -> str:
        value = self.scalar(node, where)
        if value not in allowed:
            self.fail(node, where, f"is {value!r}; allowed: {', '.join(allowed)}")
        return value
