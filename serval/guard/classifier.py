"""The classifier rail: a guard model (Llama Guard style) served by Serval, asked for a verdict on the prompt while
the main request's prefill runs.

The prompt is Llama Guard 3's moderation prompt (its hazard taxonomy S1-S14) sent to the guard server's
/v1/completions. The verdict is decoded under a regex constraint (Serval's structured outputs), so any model,
even a small or fine-tuned one that drifts from the format, answers `safe` or `unsafe` + categories and the
parse can't fail on a well-behaved server.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import aiohttp

from serval.guard.policy import ClassifierRule

# Llama Guard 3's categories (MLCommons hazard taxonomy).
CATEGORIES = {
    "S1": "Violent Crimes", "S2": "Non-Violent Crimes", "S3": "Sex-Related Crimes", "S4": "Child Sexual Exploitation",
    "S5": "Defamation", "S6": "Specialized Advice", "S7": "Privacy", "S8": "Intellectual Property",
    "S9": "Indiscriminate Weapons", "S10": "Hate", "S11": "Suicide & Self-Harm", "S12": "Sexual Content",
    "S13": "Elections", "S14": "Code Interpreter Abuse",
}
VERDICT_REGEX = r"safe|unsafe\nS[0-9]{1,2}(,S[0-9]{1,2}){0,13}"
MAX_VERDICT_TOKENS = 24


@dataclass(frozen=True)
class Verdict:
    safe: bool
    categories: tuple[str, ...] = ()


def build_prompt(messages: list[dict]) -> str:
    """Llama Guard 3's prompt for classifying the last user turn of a conversation."""
    categories = "\n".join(f"{code}: {name}." for code, name in CATEGORIES.items())
    conversation = "\n\n".join(f"{'User' if m['role'] in ('user', 'system') else 'Agent'}: {m['content']}"
                               for m in messages)
    return ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
            "Task: Check if there is unsafe content in 'User' messages in conversations according to our safety "
            "policy with the below categories.\n\n"
            f"<BEGIN UNSAFE CONTENT CATEGORIES>\n{categories}\n<END UNSAFE CONTENT CATEGORIES>\n\n"
            f"<BEGIN CONVERSATION>\n\n{conversation}\n\n<END CONVERSATION>\n\n"
            "Provide your safety assessment for ONLY THE LAST User message in the above conversation:\n"
            " - First line must read 'safe' or 'unsafe'.\n"
            " - If unsafe, a second line must include a comma-separated list of violated categories."
            "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def parse_verdict(text: str) -> Verdict:
    """'safe' or 'unsafe\\nS1,S10' (surrounding whitespace allowed); ValueError for anything else."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if lines and lines[0].lower() == "safe":
        return Verdict(True)
    if lines and lines[0].lower() == "unsafe":
        codes = tuple(code.strip().upper() for code in lines[1].split(",")) if len(lines) > 1 else ()
        return Verdict(False, codes)
    raise ValueError(f"the guard model's answer is not a verdict: {text[:80]!r}")


class ClassifierClient:
    """One aiohttp session per server (created on first use, inside the event loop)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def classify(self, rule: ClassifierRule, messages: list[dict]) -> tuple[Verdict, float]:
        """(verdict, seconds). Raises aiohttp.ClientError, TimeoutError or ValueError when there is none."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        body = {"model": rule.model, "prompt": build_prompt(messages), "max_tokens": MAX_VERDICT_TOKENS,
                "temperature": 0, "structured_outputs": {"regex": VERDICT_REGEX}}
        headers = {"Authorization": f"Bearer {rule.api_key}"} if rule.api_key else {}
        started = time.perf_counter()
        async with self._session.post(rule.url.rstrip("/") + "/completions", json=body, headers=headers,
                                      timeout=aiohttp.ClientTimeout(total=rule.timeout_seconds)) as response:
            if response.status != 200:
                raise ValueError(f"the guard model answered HTTP {response.status}: {(await response.text())[:200]}")
            payload = await response.json()
        return parse_verdict(payload["choices"][0]["text"]), time.perf_counter() - started

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
