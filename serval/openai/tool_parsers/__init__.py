"""Tool-call parsers by vLLM's names."""
