"""Architecture name -> model class, and errors that list what is supported."""
from __future__ import annotations

import types

import pytest

from serval.model import llama
from serval.model import registry
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


def test_every_family_file_imports_first_in_a_fresh_interpreter():
    # The family files import the loader, which imports the registry; the registry imports them lazily, so any
    # of them may be the first import (a user's, or a worker process's) without a circular-import error.
    # One interpreter imports torch and transformers (no Serval module: the import order under test is Serval's
    # own), then forks a child per family file that imports it first: not one torch import per file.
    import subprocess
    import sys
    entries = list(registry._MODELS.values()) + list(registry._POOLING_MODELS.values())
    modules = sorted({module for module, _ in entries})
    subprocess.run([sys.executable, "-c", FIRST_IMPORT_IN_A_FORK, *modules], check=True)


FIRST_IMPORT_IN_A_FORK = """
import importlib, os, sys, traceback
import torch, transformers
assert not [name for name in sys.modules if name.split(".")[0] == "serval"]
for module in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module("serval.model." + module)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        sys.exit(f"serval.model.{module} failed as the first import")
"""
