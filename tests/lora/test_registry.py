"""The server's adapters by name (serval.lora.registry): --lora-modules' two forms, ids that are never reused,
taken names and unknown unloads as OpenAI errors."""
from __future__ import annotations

import pytest

from serval.lora.registry import LoRAModulePath, LoRARegistry, parse_lora_module
from serval.openai.errors import APIError, InvalidArgument


def test_both_forms_of_lora_modules():
    assert parse_lora_module("sql=/adapters/sql") == LoRAModulePath("sql", "/adapters/sql")
    assert parse_lora_module('{"name": "sql", "path": "/a", "base_model_name": "base"}') == LoRAModulePath(
        "sql", "/a", "base")
    for bad in ("sql", "=/a", "sql=", '{"name": "sql"}', '{"name": "x", "path": "/a", "extra": 1}', "{oops"):
        with pytest.raises(InvalidArgument):
            parse_lora_module(bad)


def test_ids_in_order_and_never_reused():
    registry = LoRARegistry([LoRAModulePath("a", "/a"), LoRAModulePath("b", "/b")], ["base"])
    assert [(r.lora_name, r.lora_int_id) for r in registry.adapters()] == [("a", 1), ("b", 2)]
    registry.remove("a")
    assert registry.add("a", "/a2").lora_int_id == 3
    assert registry.get("a").lora_path == "/a2" and registry.get("base") is None


def test_taken_names_and_unknown_removals():
    registry = LoRARegistry([LoRAModulePath("a", "/a")], ["base"])
    for name in ("a", "base"):
        with pytest.raises(APIError) as error:
            registry.add(name, "/x")
        assert error.value.status == 400 and error.value.param == "lora_name"
    with pytest.raises(APIError) as error:
        registry.remove("nobody")
    assert error.value.status == 404
