"""Tokenizers: from a Hugging Face directory, or rebuilt from a GGUF file's metadata."""
from __future__ import annotations

import os

import transformers

from serval.model.gguf import find_gguf_file


def load_tokenizer(model: str, tokenizer: str | None = None) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer for `model` (an HF directory, a .gguf file or a directory holding one); `tokenizer` overrides
    where it is loaded from. A GGUF gives its vocabulary, merges, special tokens and chat template."""
    source = tokenizer if tokenizer is not None else model
    argument = "tokenizer" if tokenizer is not None else "model"
    if not os.path.exists(source):
        raise FileNotFoundError(f"{argument}={source!r} does not exist: pass an HF model directory, a .gguf file "
                                "or a directory holding one (Serval loads tokenizers offline only)")
    gguf_file = find_gguf_file(source)
    if gguf_file is not None:
        return _gguf_tokenizer(gguf_file)
    if not os.path.isdir(source):
        raise ValueError(f"{argument}={source!r} is neither a .gguf file nor a directory")
    try:
        return transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"no tokenizer found in {argument}={source!r} ({error}); pass tokenizer= a directory with "
                         "tokenizer.json / tokenizer_config.json, or a .gguf file") from error


def _gguf_tokenizer(path: str) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer transformers builds for `AutoTokenizer.from_pretrained(dir, gguf_file=name)`, built directly.

    AutoTokenizer first derives a model config through GGUFReader, which parses every metadata string again:
    ~5 s for SmolLM2. transformers' tokenizer builder reads only the tokenizer keys with its own array reader
    (~0.4 s). Older transformers lack that builder: fall back to AutoTokenizer there.
    """
    try:
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path) or ".",
                                                          gguf_file=os.path.basename(path))
    architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(path)
    backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return TokenizersBackend(tokenizer_object=backend, name_or_path=path, **tokenizer_config, **extra)
