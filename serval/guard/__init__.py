"""Runtime enforcement while serving: policy (YAML), API keys and budgets, input and output rails, structured
output by constrained decoding, and the audit log. `serval.guard.guard.Guard` is the entry point for servers
and the router; nothing here depends on FastAPI."""
