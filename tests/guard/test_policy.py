"""Policy files: what loads, and errors that name the file, the line and the field."""
import pytest

from serval.guard.keys import hash_key
from serval.guard.policy import PolicyError, load_policy, parse_policy

GOOD = f"""
keys:
  - id: team-a
    sha256: {hash_key("sk-a")}
    models: [llama]
    requests_per_minute: 60
    tokens_per_minute: 1000
    token_budget: 100000
    max_concurrent_requests: 2
input:
  max_prompt_tokens: 100
  deny: [{{name: weapons, pattern: "bomb", action: log}}]
  pii: {{action: block, types: [secret]}}
  injection: {{threshold: 0.7}}
output:
  deny: [{{name: halt, pattern: "forbidden"}}]
  pii: [{{types: [email], action: stop}}, {{types: [secret], action: redact}}]
audit: {{path: audit.jsonl}}
"""


def test_a_full_policy_loads(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    policy = load_policy(str(path))
    (key,) = policy.keys
    assert key.id == "team-a" and key.models == ("llama",) and key.max_concurrent_requests == 2
    assert policy.max_prompt_tokens == 100 and policy.input_deny[0].action == "log"
    assert policy.input_pii[0].types == ("secret",) and policy.injection.action == "block"
    assert policy.injection.threshold == 0.7
    assert policy.output_deny[0].action == "stop"  # the output default: a denied phrase ends the response
    assert [rule.action for rule in policy.output_pii] == ["stop", "redact"]
    assert policy.audit_path == str(tmp_path / "audit.jsonl")  # relative to the policy file


def test_empty_policy_is_no_rails():
    policy = parse_policy("")
    assert policy.keys is None and not policy.has_output_rails and not policy.input_pii


@pytest.mark.parametrize("text, expected", [
    ("input:\n  pii:\n    action: blok\n", "p.yaml:3: input.pii.action is 'blok'; allowed: block, redact, log"),
    ("input:\n  pii: {types: [email, passport]}\n", "p.yaml:2: input.pii.types[1] is 'passport'; allowed: email"),
    ("keys:\n  - id: a\n    sha256: abc\n", "p.yaml:3: keys[0].sha256 is not a hex SHA-256 digest"),
    ("keys:\n  - id: a\n", "p.yaml:2: keys[0] needs the field 'sha256'"),
    (f"keys:\n  - id: a\n    sha256: {'0' * 64}\n    requests_per_minute: 0\n",
     "p.yaml:4: keys[0].requests_per_minute is 0; allowed an integer >= 1"),
    ("input:\n  deny:\n    - name: x\n      pattern: '[a-'\n", "p.yaml:4: input.deny[0].pattern is not a valid regular"),
    ("output:\n  pii: {action: block}\n", "p.yaml:2: output.pii.action is 'block'; allowed: redact, stop, log"),
    ("input:\n  injection: {threshold: 1.5}\n", "p.yaml:2: input.injection.threshold is 1.5; allowed (0, 1]"),
    ("inputs: {}\n", "p.yaml:1: policy.inputs is not a known field"),
    ("input:\n  max_prompt_tokens: lots\n", "p.yaml:2: input.max_prompt_tokens is 'lots'"),
    ("input:\n  pii: [{types: [email]}, {types: [email, ssn]}]\n", "p.yaml:2: input.pii[1].types repeats ['email']"),
    ("keys: [\n", "p.yaml:2: not valid YAML"),
    (f"keys:\n  - {{id: a, sha256: {'0' * 64}}}\n  - {{id: a, sha256: {'1' * 64}}}\n", "p.yaml:3: keys key 'a' repeats"),
])
def test_errors_name_the_line_and_field(text, expected):
    with pytest.raises(PolicyError) as error:
        parse_policy(text, "p.yaml")
    assert str(error.value).startswith(expected), str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        load_policy(str(tmp_path / "nope.yaml"))
