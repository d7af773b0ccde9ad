"""The MoE test checkpoints' old name: build_tiny_moe is tests/model/tiny_models.py's build_tiny (same arguments),
kept while branches written against it merge."""
from tests.model.tiny_models import build_tiny as build_tiny_moe  # noqa: F401
