"""Architecture name -> model class, and errors that list what is supported."""
from __future__ import annotations

import types

import pytest

from serval.model import llama
from serval.model.registry import SUPPORTED_ARCHITECTURES, get_model_class


@pytest.mark.parametrize("architecture,cls", [
    ("LlamaForCausalLM", llama.LlamaForCausalLM), ("MistralForCausalLM", llama.MistralForCausalLM),
    ("Qwen2ForCausalLM", llama.Qwen2ForCausalLM), ("Qwen3ForCausalLM", llama.Qwen3ForCausalLM),
])
def test_known_architectures(architecture, cls):
    assert get_model_class(types.SimpleNamespace(architectures=[architecture])) is cls


def test_model_type_when_architectures_missing():
    config = types.SimpleNamespace(architectures=None, model_type="qwen3")
    assert get_model_class(config) is llama.Qwen3ForCausalLM


def test_unknown_architecture_names_it_and_the_supported_ones():
    with pytest.raises(ValueError) as error:
        get_model_class(types.SimpleNamespace(architectures=["GPT2LMHeadModel"]))
    message = str(error.value)
    assert "'GPT2LMHeadModel'" in message
    assert all(name in message for name in SUPPORTED_ARCHITECTURES)


def test_no_architecture_at_all():
    with pytest.raises(ValueError, match="no architecture.*model_type='bert'"):
        get_model_class(types.SimpleNamespace(model_type="bert"))
