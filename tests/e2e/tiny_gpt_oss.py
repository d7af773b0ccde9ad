"""A tiny random-weight gpt-oss (tests/model/tiny_models.py's family) saved with a harmony tokenizer: Qwen3's
vocabulary with harmony's markers as special tokens (no gpt-oss tokenizer installs offline) and a small chat
template that ends the prompt where gpt-oss's does, at `<|start|>assistant`, and stops at `<|return|>`."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile

from tests.openai.tool_parsers.streaming import harmony_tokenizer

# The real template's shape, cut to what the parsers and grammars depend on: messages as harmony messages, the tools
# named in a developer message, and the generation prompt `<|start|>assistant` (the model writes the channel).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}<|start|>{{ message.role }}<|message|>{{ message.content }}<|end|>"
    "{%- endfor -%}"
    "{%- if tools -%}<|start|>developer<|message|># Tools\n"
    "{%- for tool in tools %}functions.{{ tool.function.name }}\n{% endfor -%}<|end|>{%- endif -%}"
    "{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}")


@functools.cache
def tiny_gpt_oss_dir() -> str:
    import transformers

    from tests.model.tiny_models import build_tiny

    path = tempfile.mkdtemp(prefix="serval-tiny-gpt-oss-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    harmony_tokenizer().save_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)  # a copy: the shared one stays as it is
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.eos_token = "<|return|>"
    tokenizer.save_pretrained(path)
    build_tiny(path, "gpt_oss", vocab_size=len(tokenizer), eos_token_id=tokenizer.convert_tokens_to_ids("<|return|>"),
               bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), pad_token_id=tokenizer.pad_token_id,
               max_position_embeddings=1024)
    return path
