"""Runtime enforcement while serving: policy (YAML), API keys with budgets and reservations, input and output
rails, and the audit log. Servers and the router open one `serval.guard.session.GuardSession` per request on a
shared `serval.guard.guard.Guard`; nothing here depends on FastAPI."""
