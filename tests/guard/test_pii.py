"""PII and secret detection, with checksums (streaming is tests/guard/test_output.py)."""
import pytest

from serval.guard.pii import find_pii, iban_valid, luhn_valid, redact, shannon_entropy


def categories(text: str) -> list[tuple[str, str]]:
    return [(span.category, text[span.start:span.end]) for span in find_pii(text)]


@pytest.mark.parametrize("text, category, value", [
    ("write to bob.smith+tag@mail.example.co.uk today", "email", "bob.smith+tag@mail.example.co.uk"),
    ("call +1 415-555-0132 now", "phone", "+1 415-555-0132"),
    ("call (415) 555-0132 now", "phone", "(415) 555-0132"),
    ("card 4111 1111 1111 1111 ok", "credit_card", "4111 1111 1111 1111"),
    ("card 5500-0000-0000-0004 ok", "credit_card", "5500-0000-0000-0004"),
    ("iban DE89 3704 0044 0532 0130 00 ok", "iban", "DE89 3704 0044 0532 0130 00"),
    ("iban GB82WEST12345698765432 ok", "iban", "GB82WEST12345698765432"),
    ("ssn 123-45-6789 ok", "ssn", "123-45-6789"),
    ("host 192.168.10.1. ok", "ip_address", "192.168.10.1"),
    ("host 2001:db8::8a2e:370:7334 ok", "ip_address", "2001:db8::8a2e:370:7334"),
    ("key sk-proj-abcdefghijklmnopqrstuvwxyz0123 ok", "secret", "sk-proj-abcdefghijklmnopqrstuvwxyz0123"),
    ("aws AKIAIOSFODNN7EXAMPLE ok", "secret", "AKIAIOSFODNN7EXAMPLE"),
    ("gh ghp_abcdefghijklmnopqrstuvwxyz0123456789 ok", "secret", "ghp_abcdefghijklmnopqrstuvwxyz0123456789"),
    ("token a8Fk2LmQ9zXp4RtY7wVb3NcJ6hGd ok", "secret", "a8Fk2LmQ9zXp4RtY7wVb3NcJ6hGd"),
])
def test_detects(text, category, value):
    assert (category, value) in categories(text)


@pytest.mark.parametrize("text", [
    "card 4111 1111 1111 1112 fails Luhn",
    "iban DE89 3704 0044 0532 0130 01 fails mod 97",
    "ssn 000-12-3456 is not issued",
    "ip 999.1.1.1 is not an address",
    "version 1.2.3 on 2024-01-01 costs 12.50",
    "internationalization and counterrevolutionaries are long words",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa1 has no entropy",
])
def test_ignores_look_alikes(text):
    assert categories(text) == []


def test_checksums():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112") and not luhn_valid("411")
    assert iban_valid("DE89370400440532013000") and not iban_valid("DE89370400440532013001")
    assert shannon_entropy("aaaa") == 0.0 and shannon_entropy("abcd") == 2.0


def test_redact_and_types_filter():
    text = "mail bob@example.com from 10.0.0.1"
    assert redact(text, find_pii(text)) == "mail [REDACTED:email] from [REDACTED:ip_address]"
    assert [s.category for s in find_pii(text, types=("ip_address",))] == ["ip_address"]


def test_detectors_read_the_visible_text():
    text = "card 4111\u200b1111 1111 1111 and \uff11\uff12\uff13-45-6789 ok"
    assert categories(text) == [("credit_card", "4111\u200b1111 1111 1111"), ("ssn", "\uff11\uff12\uff13-45-6789")]
    assert redact(text, find_pii(text)) == "card [REDACTED:credit_card] and [REDACTED:ssn] ok"
