"""What a run did on the server, from its Prometheus `/metrics` before and after the run: speculative decoding's
acceptance, where the server counts it (Serval's `serval:spec_decode_*` and vLLM's `vllm:spec_decode_*`, the same
names after the prefix). A server without `/metrics`, or without those counters, gives None: the report shows "-".
"""
from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

SPEC_COUNTERS = ("spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens")
PREFIXES = ("serval:", "vllm:")


def metrics_url(base_url: str) -> str:
    """/metrics sits at the server's root, beside /v1."""
    return base_url.removesuffix("/v1") + "/metrics"


def spec_decode_counters(base_url: str, api_key: str | None = None, timeout: float = 5.0) -> dict[str, float] | None:
    """The speculative-decoding counters' totals (summed over labels), or None when the server doesn't expose them."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(metrics_url(base_url), headers=headers, timeout=timeout)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    totals: dict[str, float] = {}
    try:
        families = list(text_string_to_metric_families(response.text))
    except ValueError:  # not Prometheus text
        return None
    for family in families:
        for prefix in PREFIXES:
            name = family.name.removeprefix(prefix)
            if family.name.startswith(prefix) and name in SPEC_COUNTERS:
                totals[name] = totals.get(name, 0.0) + sum(sample.value for sample in family.samples
                                                           if sample.name.endswith("_total"))
    return totals if len(totals) == len(SPEC_COUNTERS) else None


def spec_decode_summary(before: dict[str, float] | None, after: dict[str, float] | None) -> dict | None:
    """Acceptance over the run: the share of drafted tokens accepted, and the mean tokens a verify step gave
    (accepted drafts per draft, plus the target's own token). None without counters or without drafts."""
    if before is None or after is None:
        return None
    drafts = after["spec_decode_num_drafts"] - before["spec_decode_num_drafts"]
    draft_tokens = after["spec_decode_num_draft_tokens"] - before["spec_decode_num_draft_tokens"]
    accepted = after["spec_decode_num_accepted_tokens"] - before["spec_decode_num_accepted_tokens"]
    if drafts <= 0 or draft_tokens <= 0:
        return None
    return {"num_drafts": int(drafts), "num_draft_tokens": int(draft_tokens), "num_accepted_tokens": int(accepted),
            "acceptance_rate": accepted / draft_tokens, "acceptance_length": 1.0 + accepted / drafts}
