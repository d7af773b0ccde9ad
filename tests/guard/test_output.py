"""Streaming output rails: a match split across chunks anywhere is still caught, text before it isn't delayed."""
import random

from serval.guard.output import OutputFilter
from serval.guard.policy import parse_policy

POLICY = parse_policy("""
output:
  pii: [{types: [secret, email], action: redact}, {types: [ip_address], action: log}]
  deny: [{name: rude, pattern: "darn+", action: redact}, {name: halt, pattern: "forbidden", action: stop}]
""")
SECRET = "sk-proj-Q7fA2kLm9ZxP4rT8wVb3NcJ6hGd1"


def new_filter(decisions=None):
    return OutputFilter(POLICY, (decisions if decisions is not None else []).append, lambda rail, seconds: None)


def run(chunks: list[str]) -> tuple[str, bool, list[str]]:
    output_filter = new_filter()
    texts, stopped = [], False
    for chunk in chunks:
        step = output_filter.push(chunk)
        texts.append(step.text)
        stopped = step.stopped
        if stopped:
            break
    if not stopped:
        last = output_filter.finish()
        texts.append(last.text)
        stopped = last.stopped
    return "".join(texts), stopped, texts


def random_chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, min(40, len(text) - 1))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def test_every_split_of_a_secret_is_redacted():
    text = f"my key is {SECRET} and mail bob@example.org from 10.0.0.7, darnn it"
    expected = "my key is [REDACTED:secret] and mail [REDACTED:email] from 10.0.0.7, [REDACTED:deny:rude] it"
    rng = random.Random(0)
    for _ in range(300):
        assert run(random_chunks(text, rng))[0] == expected
    assert run([text])[0] == expected
    assert run(list(text))[0] == expected  # one character at a time


def test_holds_back_only_what_may_still_match():
    output_filter = new_filter()
    assert output_filter.push("Hello there, my key is sk-pr").text == "Hello there, my key is "
    assert output_filter.push("oj-Q7fA2kLm9Zx").text == ""
    assert output_filter.push("P4rT8wVb3NcJ6hGd1 thanks").text == "[REDACTED:secret] "
    assert output_filter.finish().text == "thanks"


def test_stop_ends_before_the_match():
    for chunks in (["this is fine but forb", "idden text"], ["this is fine but forbidden text"]):
        text, stopped, _ = run(chunks)
        assert (text, stopped) == ("this is fine but ", True)


def test_log_records_without_changing_text():
    decisions = []
    output_filter = new_filter(decisions)
    step = output_filter.filter_all("ping 10.1.2.3 now")
    assert step.text == "ping 10.1.2.3 now" and not step.stopped
    assert [(d.rail, d.action, d.category) for d in decisions] == [("output_pii", "log", "ip_address")]
