"""What a run did on the server, from its Prometheus `/metrics` before and after the run: speculative decoding's
acceptance and the prefix cache's hit rate, where the server counts them (Serval's `serval:spec_decode_*` and
`serval:prefix_cache_*`, vLLM's `vllm:` counters of the same names). A server without `/metrics`, or without
those counters, gives None: the report shows "-".
"""
from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

SPEC_COUNTERS = ("spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens")
PREFIX_CACHE_COUNTERS = ("prefix_cache_queries", "prefix_cache_hits")  # in tokens, on both servers
PREFIXES = ("serval:", "vllm:")


def metrics_url(base_url: str) -> str:
    """/metrics sits at the server's root, beside /v1."""
    return base_url.removesuffix("/v1") + "/metrics"


def server_counters(base_url: str, api_key: str | None = None, timeout: float = 5.0) -> dict[str, float]:
    """The totals (summed over labels) of the SPEC_COUNTERS and PREFIX_CACHE_COUNTERS the server exposes; {} when
    it has no Prometheus `/metrics`."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(metrics_url(base_url), headers=headers, timeout=timeout)
    except httpx.HTTPError:
        return {}
    if response.status_code != 200:
        return {}
    totals: dict[str, float] = {}
    try:
        families = list(text_string_to_metric_families(response.text))
    except ValueError:  # not Prometheus text
        return {}
    for family in families:
        for prefix in PREFIXES:
            name = family.name.removeprefix(prefix)
            if family.name.startswith(prefix) and name in SPEC_COUNTERS + PREFIX_CACHE_COUNTERS:
                totals[name] = totals.get(name, 0.0) + sum(sample.value for sample in family.samples
                                                           if sample.name.endswith("_total"))
    return totals


def spec_decode_counters(base_url: str, api_key: str | None = None, timeout: float = 5.0) -> dict[str, float] | None:
    """The speculative-decoding counters' totals, or None when the server doesn't expose them."""
    return _pick(server_counters(base_url, api_key, timeout), SPEC_COUNTERS)


def _pick(totals: dict[str, float] | None, names: tuple[str, ...]) -> dict[str, float] | None:
    if not totals or any(name not in totals for name in names):
        return None
    return {name: totals[name] for name in names}


def spec_decode_summary(before: dict[str, float] | None, after: dict[str, float] | None) -> dict | None:
    """Acceptance over the run: the share of drafted tokens accepted, and the mean tokens a verify step gave
    (accepted drafts per draft, plus the target's own token). None without counters or without drafts."""
    before, after = _pick(before, SPEC_COUNTERS), _pick(after, SPEC_COUNTERS)
    if before is None or after is None:
        return None
    drafts = after["spec_decode_num_drafts"] - before["spec_decode_num_drafts"]
    draft_tokens = after["spec_decode_num_draft_tokens"] - before["spec_decode_num_draft_tokens"]
    accepted = after["spec_decode_num_accepted_tokens"] - before["spec_decode_num_accepted_tokens"]
    if drafts <= 0 or draft_tokens <= 0:
        return None
    return {"num_drafts": int(drafts), "num_draft_tokens": int(draft_tokens), "num_accepted_tokens": int(accepted),
            "acceptance_rate": accepted / draft_tokens, "acceptance_length": 1.0 + accepted / drafts}


def prefix_cache_summary(before: dict[str, float] | None, after: dict[str, float] | None) -> dict | None:
    """Prompt tokens the server looked up in its prefix cache over the run and the share it found (warm-up requests
    included). None without counters or without lookups."""
    before, after = _pick(before, PREFIX_CACHE_COUNTERS), _pick(after, PREFIX_CACHE_COUNTERS)
    if before is None or after is None:
        return None
    queries = after["prefix_cache_queries"] - before["prefix_cache_queries"]
    hits = after["prefix_cache_hits"] - before["prefix_cache_hits"]
    if queries <= 0:
        return None
    return {"queried_tokens": int(queries), "hit_tokens": int(hits), "hit_rate": hits / queries}
