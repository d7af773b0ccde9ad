"""Speculative decoding: proposers guess the next tokens cheaply, the target model verifies them in one forward.

config (SpeculativeConfig, parsed from vLLM's `speculative_config`), ngram (prompt lookup), suffix (a bounded index
over recent requests), replay (benchmark-only: a known continuation with a controlled acceptance rate),
rejection_sampler (which drafted tokens the target keeps, preserving its distribution), decoder (the engine's
per-step hooks: propose, account for what the verify step accepted, counters).
"""
