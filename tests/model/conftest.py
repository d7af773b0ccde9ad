"""The model tests' shared checkpoints: each tiny family model (tests/model/tiny_models.py) built once per session,
however many test files compare against it."""
from __future__ import annotations

import pytest

from tests.model.tiny_models import build_tiny


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(family, **overrides) -> (directory, transformers model). Tests must not change the model they get back
    (copy.deepcopy it first): the next test compares against the same object."""
    built = {}

    def get(family: str, **overrides):
        key = (family, repr(sorted(overrides.items())))
        if key not in built:
            path = tmp_path_factory.mktemp(family)
            built[key] = (str(path), build_tiny(path, family, **overrides))
        return built[key]

    return get
