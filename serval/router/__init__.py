"""`serval route`: an OpenAI-compatible gateway in front of many models and engines (see docs/router.md)."""
