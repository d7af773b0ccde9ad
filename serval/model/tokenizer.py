"""Tokenizers: from a Hugging Face directory, or rebuilt from a GGUF file's metadata.

A GGUF without a chat template of its own (the Gemma 3 270M conversion has none) gets its family's turn format, so
that chat requests work; `model` may also be a short alias of a packaged model (serval.model.default_model).
"""
from __future__ import annotations

import os

import numpy as np
import transformers

from serval.model.default_model import resolve_model
from serval.model.gguf import find_gguf_file
from serval.model.gguf_reader import read_gguf_file

# Gemma's turn format (text only): <start_of_turn>user|model ... <end_of_turn>; a system message is prefixed to the
# first user turn, since Gemma has no system role.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_prefix = messages[0]['content'] + '\n\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system_prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (system_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
_DEFAULT_CHAT_TEMPLATES = {"gemma3": GEMMA_CHAT_TEMPLATE}


def load_tokenizer(model: str, tokenizer: str | None = None) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer for `model` (an HF directory, a .gguf file or a directory holding one); `tokenizer` overrides
    where it is loaded from. A GGUF gives its vocabulary, merges, special tokens and chat template."""
    source = resolve_model(tokenizer if tokenizer is not None else model)
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
    ~5 s for SmolLM2. Here the metadata comes from Serval's header reader (~0.1 s) and goes to transformers'
    tokenizer builder. Older transformers lack that builder: fall back to AutoTokenizer there.
    """
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            _SPECIAL_TOKENS, GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path) or ".",
                                                          gguf_file=os.path.basename(path))
    metadata = {name: value.tolist() if isinstance(value, np.ndarray) else value
                for name, value in read_gguf_file(path).metadata.items()}
    architecture = metadata["general.architecture"]
    grouped = {group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items()
                       if f"tokenizer.{key}" in metadata}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        # As transformers: llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise.
        tokenizer_config.setdefault("add_bos_token", True)
    elif tokenizer_dict.get("tokenizer_type") == "gemma4":
        tokenizer_config["add_bos_token"] = False
    for name, key in _SPECIAL_TOKENS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokenizer_dict["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    loaded = TokenizersBackend(tokenizer_object=backend, name_or_path=path, **tokenizer_config, **extra)
    if loaded.chat_template is None and architecture in _DEFAULT_CHAT_TEMPLATES:
        loaded.chat_template = _DEFAULT_CHAT_TEMPLATES[architecture]
    return loaded
