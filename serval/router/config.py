"""The router's configuration: backends, model groups, fallbacks, health, breaker, retries, timeouts.

Loaded from YAML once and validated here, at the edge; everything after trusts it. Every error is a
ConfigError that names the backend or group and the field, what was given and what is allowed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from urllib.parse import urlparse

import yaml

ENGINES = ("serval", "vllm", "sglang", "lmdeploy", "trtllm", "openai-compatible")
POLICIES = ("round_robin", "least_requests", "cache_aware", "session", "cost", "latency")
MODALITIES = ("text", "image", "audio", "video")
# Engines whose /metrics carry queue and KV-cache gauges the router can use (serval:, vllm:, sglang: names).
SCRAPED_ENGINES = ("serval", "vllm", "sglang")


class ConfigError(ValueError):
    pass


@dataclass
class BackendConfig:
    name: str
    url: str  # base URL without /v1
    models: list[str]  # the model names this backend serves (what is sent in "model")
    engine: str = "openai-compatible"
    max_context: int | None = None  # None: learned from the backend's /v1/models max_model_len when offered
    modalities: list[str] = field(default_factory=lambda: ["text"])
    structured_output: bool | None = None  # None: unknown, assumed able; false keeps such requests away
    input_price: float = 0.0  # $ per 1M tokens
    output_price: float = 0.0
    weight: float = 1.0
    api_key: str | None = None  # sent to the backend as a Bearer token
    scrape_metrics: bool = True  # read load signals from its /metrics (serval, vllm, sglang engines)


@dataclass
class GroupConfig:
    """What clients ask for by name: a policy over some backends."""
    name: str
    backends: list[str]
    policy: str = "cache_aware"
    aliases: list[str] = field(default_factory=list)
    # cache_aware: route to the best prefix match when it covers more than cache_threshold of the prompt;
    # ignore the cache when loads differ by more than balance_abs_threshold AND max > min * balance_rel_threshold.
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 32
    balance_rel_threshold: float = 1.5
    max_tree_chars: int = 4_000_000  # per backend; least recently used prefixes are evicted past it
    session_header: str = "x-session-id"  # session: the header hashed; without it, the body's "user"


@dataclass
class RouterConfig:
    backends: dict[str, BackendConfig]
    groups: dict[str, GroupConfig]
    context_window_fallbacks: dict[str, list[str]] = field(default_factory=dict)
    health_check_interval: float = 5.0  # seconds; 0 turns active checks (and metric scraping) off
    health_check_timeout: float = 2.0
    failure_threshold: int = 3  # consecutive failures that open a backend's breaker
    cooldown: float = 10.0  # seconds an open breaker waits before letting one probe request through
    num_retries: int = 2  # other backends tried when one fails before the first byte reached the client
    connect_timeout: float = 5.0
    read_timeout: float = 600.0  # longest silence from a backend, before or between chunks
    api_keys: list[str] = field(default_factory=list)  # clients must send one of these, when given
    max_body_bytes: int = 32 * 1024 * 1024  # larger request bodies are refused with 413 before they are read

    def group_for(self, model: str) -> GroupConfig | None:
        group = self.groups.get(model)
        if group is not None:
            return group
        return next((g for g in self.groups.values() if model in g.aliases), None)

    def public_names(self) -> list[str]:
        return [name for group in self.groups.values() for name in (group.name, *group.aliases)]


def load_config(path: str) -> RouterConfig:
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle)
    except OSError as error:
        raise ConfigError(f"cannot read router config {path}: {error}") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"router config {path} is not valid YAML: {error}") from error
    return parse_config(data, source=path)


def parse_config(data, source: str = "router config") -> RouterConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with 'backends', got {type(data).__name__}")
    _no_unknown(data, {"backends", "models", "policy", "fallbacks", "health_check", "breaker", "retries",
                       "timeouts", "api_keys", "max_body_bytes"}, source)
    rows = data.get("backends")
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f"{source}: 'backends' must be a non-empty list of backends, got {rows!r}")
    backends: dict[str, BackendConfig] = {}
    for index, row in enumerate(rows):
        backend = _backend(row, index)
        if backend.name in backends:
            raise ConfigError(f"backend {backend.name!r}: the name is used twice; names must be unique")
        backends[backend.name] = backend
    default_policy = _choice(data.get("policy", "cache_aware"), POLICIES, "policy")
    groups = _groups(data.get("models"), backends, default_policy)
    fallbacks = _fallbacks(data.get("fallbacks") or {}, groups)
    config = RouterConfig(backends=backends, groups=groups, context_window_fallbacks=fallbacks)
    _section(config, data.get("health_check"), "health_check",
             {"interval_s": "health_check_interval", "timeout_s": "health_check_timeout"})
    _section(config, data.get("breaker"), "breaker",
             {"failure_threshold": "failure_threshold", "cooldown_s": "cooldown"})
    _section(config, data.get("timeouts"), "timeouts",
             {"connect_s": "connect_timeout", "read_s": "read_timeout"})
    if "retries" in data:
        config.num_retries = _number(data["retries"], "retries", minimum=0, integer=True)
    if "max_body_bytes" in data:
        config.max_body_bytes = _number(data["max_body_bytes"], "max_body_bytes", minimum=1, integer=True)
    if config.failure_threshold < 1:
        raise ConfigError(f"breaker.failure_threshold: {config.failure_threshold}; allowed: an integer >= 1")
    keys = data.get("api_keys") or []
    if not isinstance(keys, list) or not all(isinstance(key, str) and key for key in keys):
        raise ConfigError(f"api_keys: {keys!r}; allowed: a list of non-empty strings")
    config.api_keys = keys
    return config


def _backend(row, index: int) -> BackendConfig:
    where = f"backends[{index}]"
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected a mapping with name, url and models, got {row!r}")
    name = row.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.name: {name!r}; allowed: a non-empty string")
    where = f"backend {name!r}"
    _no_unknown(row, {"name", "url", "models", "engine", "max_context", "modalities", "structured_output",
                      "price", "weight", "api_key", "scrape_metrics"}, where)
    url = row.get("url")
    parsed = urlparse(url) if isinstance(url, str) else None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"{where}: url {url!r}; allowed: http(s)://host:port")
    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]  # the router adds /v1/...; /health and /metrics live at the root
    models = row.get("models")
    if isinstance(models, str):
        models = [models]
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise ConfigError(f"{where}: models {models!r}; allowed: a non-empty list of served model names")
    modalities = row.get("modalities", ["text"])
    if not isinstance(modalities, list) or not modalities:
        raise ConfigError(f"{where}: modalities {modalities!r}; allowed: a list from {', '.join(MODALITIES)}")
    for modality in modalities:
        _choice(modality, MODALITIES, f"{where}: modalities")
    price = row.get("price") or {}
    if not isinstance(price, dict) or set(price) - {"input", "output"}:
        raise ConfigError(f"{where}: price {price!r}; allowed: {{input: $/1M tokens, output: $/1M tokens}}")
    max_context = row.get("max_context")
    return BackendConfig(
        name=name, url=url, models=models,
        engine=_choice(row.get("engine", "openai-compatible"), ENGINES, f"{where}: engine"),
        max_context=None if max_context is None else _number(max_context, f"{where}: max_context", 1, integer=True),
        modalities=modalities,
        structured_output=None if row.get("structured_output") is None else _bool(
            row["structured_output"], f"{where}: structured_output"),
        input_price=_number(price.get("input", 0.0), f"{where}: price.input", 0),
        output_price=_number(price.get("output", 0.0), f"{where}: price.output", 0),
        weight=_number(row.get("weight", 1.0), f"{where}: weight", 0, exclusive=True),
        api_key=row.get("api_key"),
        scrape_metrics=_bool(row.get("scrape_metrics", True), f"{where}: scrape_metrics"))


def _groups(rows, backends: dict[str, BackendConfig], default_policy: str) -> dict[str, GroupConfig]:
    groups: dict[str, GroupConfig] = {}
    if rows is None:  # one group per served model name, over every backend that serves it
        for backend in backends.values():
            for model in backend.models:
                groups.setdefault(model, GroupConfig(name=model, backends=[], policy=default_policy))
                groups[model].backends.append(backend.name)
        return groups
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f"models: {rows!r}; allowed: a non-empty list of model groups, or leave it out")
    taken: set[str] = set()
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("name"), str) or not row["name"]:
            raise ConfigError(f"models[{index}]: expected a mapping with a name, got {row!r}")
        where = f"model group {row['name']!r}"
        fields = {"name", "backends", "policy", "aliases", "cache_threshold", "balance_abs_threshold",
                  "balance_rel_threshold", "max_tree_chars", "session_header"}
        _no_unknown(row, fields, where)
        members = row.get("backends")
        if members is None:
            members = [b.name for b in backends.values() if row["name"] in b.models]
        if not isinstance(members, list) or not members:
            raise ConfigError(f"{where}: backends {members!r}; allowed: a non-empty list of backend names "
                              f"({', '.join(backends)}), or leave it out to use every backend serving "
                              f"{row['name']!r}")
        unknown = [member for member in members if member not in backends]
        if unknown:
            raise ConfigError(f"{where}: backends {unknown} are not defined; defined: {', '.join(backends)}")
        aliases = row.get("aliases") or []
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
            raise ConfigError(f"{where}: aliases {aliases!r}; allowed: a list of names")
        for public in (row["name"], *aliases):
            if public in taken:
                raise ConfigError(f"{where}: the name {public!r} is used by another group or alias")
            taken.add(public)
        group = GroupConfig(name=row["name"], backends=list(members),
                            policy=_choice(row.get("policy", default_policy), POLICIES, f"{where}: policy"),
                            aliases=aliases)
        for key, minimum, integer in (("cache_threshold", 0, False), ("balance_abs_threshold", 0, True),
                                      ("balance_rel_threshold", 1, False), ("max_tree_chars", 1, True)):
            if key in row:
                setattr(group, key, _number(row[key], f"{where}: {key}", minimum, integer=integer))
        if group.cache_threshold > 1:
            raise ConfigError(f"{where}: cache_threshold {group.cache_threshold}; allowed: 0 to 1")
        if "session_header" in row:
            if not isinstance(row["session_header"], str) or not row["session_header"]:
                raise ConfigError(f"{where}: session_header {row['session_header']!r}; allowed: a header name")
            group.session_header = row["session_header"].lower()
        groups[group.name] = group
    return groups


def _fallbacks(data, groups: dict[str, GroupConfig]) -> dict[str, list[str]]:
    if not isinstance(data, dict):
        raise ConfigError(f"fallbacks: {data!r}; allowed: {{context_window: {{group: [groups...]}}}}")
    _no_unknown(data, {"context_window"}, "fallbacks")
    table = data.get("context_window") or {}
    if not isinstance(table, dict):
        raise ConfigError(f"fallbacks.context_window: {table!r}; allowed: a mapping group -> [groups]")
    out = {}
    for source, targets in table.items():
        targets = [targets] if isinstance(targets, str) else targets
        for name in [source, *(targets or [])]:
            if name not in groups:
                raise ConfigError(f"fallbacks.context_window: model group {name!r} is not defined; "
                                  f"defined: {', '.join(groups)}")
        if not targets:
            raise ConfigError(f"fallbacks.context_window.{source}: give at least one group to fall back to")
        out[source] = list(targets)
    return out


def _section(config: RouterConfig, data, section: str, keys: dict[str, str]) -> None:
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"{section}: {data!r}; allowed: a mapping with {', '.join(keys)}")
    _no_unknown(data, set(keys), section)
    for key, attribute in keys.items():
        if key in data:
            integer = attribute == "failure_threshold"
            setattr(config, attribute, _number(data[key], f"{section}.{key}", 0, integer=integer))


def _no_unknown(row: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(row) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; allowed: {', '.join(sorted(allowed))}")


def _choice(value, allowed: tuple[str, ...], where: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{where}: {value!r}; allowed: {', '.join(allowed)}")
    return value


def _bool(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {value!r}; allowed: true or false")
    return value


def _number(value, where: str, minimum: float, integer: bool = False, exclusive: bool = False):
    kind = "an integer" if integer else "a number"
    valid = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not valid or (not integer and not math.isfinite(value)):
        raise ConfigError(f"{where}: {value!r}; allowed: {kind} {'>' if exclusive else '>='} {minimum}")
    if value < minimum or (exclusive and value == minimum):
        raise ConfigError(f"{where}: {value!r}; allowed: {kind} {'>' if exclusive else '>='} {minimum}")
    return value
