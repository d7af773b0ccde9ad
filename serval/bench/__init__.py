"""Benchmarks: workloads, the load generator for OpenAI-compatible endpoints, metrics, reports, cost."""
