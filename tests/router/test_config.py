"""Router config: a valid YAML loads into dataclasses; every error names the backend or group and the field."""
import pytest

from serval.router.config import ConfigError, load_config, parse_config

BACKENDS = [{"name": "a", "url": "http://127.0.0.1:8001/v1", "models": ["llama"], "engine": "serval",
             "price": {"input": 0.1, "output": 0.4}, "max_context": 4096},
            {"name": "b", "url": "http://127.0.0.1:8002", "models": "llama", "engine": "vllm", "weight": 2},
            {"name": "c", "url": "http://127.0.0.1:8003", "models": ["qwen"]}]


def test_groups_default_to_one_per_served_model():
    config = parse_config({"backends": BACKENDS, "policy": "round_robin"})
    assert set(config.groups) == {"llama", "qwen"}
    assert config.groups["llama"].backends == ["a", "b"] and config.groups["llama"].policy == "round_robin"
    a = config.backends["a"]
    assert a.url == "http://127.0.0.1:8001" and a.input_price == 0.1 and a.output_price == 0.4
    assert config.backends["b"].models == ["llama"] and config.backends["b"].weight == 2
    assert config.backends["c"].engine == "openai-compatible" and config.backends["c"].structured_output is None


def test_full_config_from_yaml(tmp_path):
    path = tmp_path / "router.yaml"
    path.write_text("""
backends:
  - {name: a, url: http://127.0.0.1:8001, models: [llama], max_context: 2048}
  - {name: b, url: http://127.0.0.1:8002, models: [llama-long], max_context: 32768}
models:
  - {name: llama, backends: [a], policy: cache_aware, aliases: [gpt-4o], cache_threshold: 0.5,
     balance_abs_threshold: 8, session_header: X-User}
  - {name: llama-long, policy: cost}
fallbacks: {context_window: {llama: llama-long}}
health_check: {interval_s: 1, timeout_s: 0.5}
breaker: {failure_threshold: 2, cooldown_s: 3}
retries: 1
timeouts: {connect_s: 1, read_s: 30}
api_keys: [sk-1]
""")
    config = load_config(str(path))
    llama = config.groups["llama"]
    assert llama.cache_threshold == 0.5 and llama.balance_abs_threshold == 8 and llama.session_header == "x-user"
    assert config.group_for("gpt-4o") is llama and config.group_for("nope") is None
    assert config.groups["llama-long"].backends == ["b"]
    assert config.context_window_fallbacks == {"llama": ["llama-long"]}
    assert (config.health_check_interval, config.health_check_timeout, config.failure_threshold, config.cooldown,
            config.num_retries, config.connect_timeout, config.read_timeout) == (1, 0.5, 2, 3, 1, 1, 30)
    assert config.public_names() == ["llama", "gpt-4o", "llama-long"] and config.api_keys == ["sk-1"]


@pytest.mark.parametrize("change, words", [
    ({"backends": []}, ["backends", "non-empty"]),
    ({"backends": [{**BACKENDS[0], "url": "127.0.0.1:8001"}]}, ["backend 'a'", "url", "http(s)://host:port"]),
    ({"backends": [{**BACKENDS[0], "engine": "tgi"}]}, ["backend 'a'", "engine", "'tgi'", "vllm", "sglang"]),
    ({"backends": [{**BACKENDS[0], "models": []}]}, ["backend 'a'", "models"]),
    ({"backends": [{**BACKENDS[0], "weight": 0}]}, ["backend 'a'", "weight", "> 0"]),
    ({"backends": [{**BACKENDS[0], "max_context": "big"}]}, ["backend 'a'", "max_context", "'big'", "integer"]),
    ({"backends": [{**BACKENDS[0], "price": {"input": -1}}]}, ["backend 'a'", "price.input", ">= 0"]),
    ({"backends": [{**BACKENDS[0], "colour": "red"}]}, ["backend 'a'", "unknown", "colour"]),
    ({"backends": [BACKENDS[0], BACKENDS[0]]}, ["backend 'a'", "twice"]),
    ({"backends": [{"url": "http://x:1", "models": ["m"]}]}, ["backends[0].name"]),
    ({"models": [{"name": "g", "backends": ["zzz"]}]}, ["model group 'g'", "zzz", "not defined"]),
    ({"models": [{"name": "g", "backends": ["a"], "policy": "random"}]}, ["model group 'g'", "policy", "cache_aware"]),
    ({"models": [{"name": "g", "backends": ["a"], "cache_threshold": 2}]}, ["model group 'g'", "cache_threshold"]),
    ({"models": [{"name": "g", "backends": ["a"]}, {"name": "h", "backends": ["a"], "aliases": ["g"]}]},
     ["model group 'h'", "'g'", "another"]),
    ({"models": [{"name": "nobody-serves-this"}]}, ["nobody-serves-this", "backends"]),
    ({"fallbacks": {"context_window": {"llama": "ghost"}}}, ["fallbacks.context_window", "ghost"]),
    ({"breaker": {"failure_threshold": 0}}, ["breaker.failure_threshold"]),
    ({"retries": -1}, ["retries", ">= 0"]),
    ({"timeouts": {"read": 3}}, ["timeouts", "unknown", "read"]),
    ({"routes": []}, ["unknown", "routes"]),
    ({"max_body_bytes": 0}, ["max_body_bytes", ">= 1"]),
])
def test_errors_name_the_field_and_what_is_allowed(change, words):
    with pytest.raises(ConfigError) as info:
        parse_config({"backends": BACKENDS, **change})
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("backends: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    bad.write_text("- just a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(bad))


def test_serval_route_exits_2_naming_the_field(tmp_path):
    import subprocess
    import sys

    from tests.e2e.server import REPO_ROOT
    path = tmp_path / "router.yaml"
    path.write_text("backends:\n  - {name: a, url: http://127.0.0.1:1, models: [m], engine: tgi}\n")
    done = subprocess.run([sys.executable, "-m", "serval.cli", "route", "--config", str(path)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "backend 'a': engine: 'tgi'; allowed: serval, vllm" in done.stderr
