"""serval.model.tokenizer: the GGUF tokenizer equals transformers' GGUF tokenizer; HF directories load as saved."""
from __future__ import annotations

import os

import numpy as np
import pytest
import transformers
from transformers.integrations.gguf.reader import read_gguf_metadata

from serval.model.default_model import default_model_path
from serval.model.tokenizer import load_tokenizer
from tests.conftest import hf_gguf_tokenizer
from tests.model.test_gguf import write_gguf

TEXTS = [
    "Hello, world!",
    "  leading spaces, trailing spaces   ",
    "line one\nline two\n\n\ttabbed\r\nwindows",
    "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧",
    "CJK: 你好，世界。日本語のテキスト 한국어",
    "Ünïcödé café naïve façade — “quotes” …",
    "code: def f(x):\n    return x**2 + 3.14159  # 1234567890",
    "<|im_start|>user\nspecial tokens inline<|im_end|><|endoftext|>",
    "",
]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3? 😀"},
]


@pytest.fixture(scope="module")
def gguf_tokenizers():
    """(ours, transformers') tokenizers of the default model's GGUF."""
    path = default_model_path()
    return load_tokenizer(path), hf_gguf_tokenizer(path)


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_tokenizer_encodes_and_decodes_like_transformers(gguf_tokenizers, text):
    ours, reference = gguf_tokenizers
    ids = ours.encode(text)
    assert ids == reference.encode(text)
    assert ours.decode(ids) == reference.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    assert ours.convert_ids_to_tokens(ids) == reference.convert_ids_to_tokens(ids)
    if "<|" not in text:
        assert ours.decode(ids) == text  # byte-level BPE is lossless


def test_gguf_tokenizer_special_tokens(gguf_tokenizers):
    ours, reference = gguf_tokenizers
    assert len(ours) == len(reference) == 49152
    assert (ours.bos_token, ours.eos_token, ours.unk_token, ours.pad_token) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_end|>")
    assert (ours.bos_token_id, ours.eos_token_id, ours.unk_token_id, ours.pad_token_id) == (1, 2, 0, 2)
    assert ours.all_special_tokens == reference.all_special_tokens
    assert ours.get_added_vocab() == reference.get_added_vocab()
    assert ours.encode("<|im_end|>") == [2]  # kept whole, not cut into pieces
    assert ours.encode("hi")[0] != ours.bos_token_id  # the file says add_bos_token=False


def test_gguf_tokenizer_chat_template(gguf_tokenizers):
    ours, reference = gguf_tokenizers
    assert ours.chat_template is not None and ours.chat_template == reference.chat_template
    text = ours.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert text == reference.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>")
    assert text.endswith("<|im_start|>user\nAnd 3+3? 😀<|im_end|>\n<|im_start|>assistant\n")
    ids = ours.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_dict=False)
    assert ids == ours.encode(text) and ids.count(ours.bos_token_id) == 5  # 4 turns + generation prompt


def test_qwen2_gguf_tokenizer_matches_transformers(tmp_path, tiny_models):
    """For a qwen2 file transformers picks Qwen2Tokenizer and the qwen2 split regex; ours must encode the same."""
    metadata, _ = read_gguf_metadata(default_model_path(), ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))

    def add_tokenizer(writer):
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(metadata["tokenizer.ggml.tokens"])
        writer.add_token_merges(metadata["tokenizer.ggml.merges"])
        token_types = np.ones(len(metadata["tokenizer.ggml.tokens"]), dtype=np.int32)
        token_types[:17] = 3  # CONTROL, as in SmolLM2's file
        writer.add_token_types(token_types.tolist())
        writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")

    write_gguf(tmp_path / "qwen.gguf", "qwen2", tiny_models("qwen2")[1], add_metadata=add_tokenizer)
    ours = load_tokenizer(str(tmp_path / "qwen.gguf"))
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="qwen.gguf")
    for text in TEXTS + ["numbers 1234567 split in threes", "don't I'll WE'RE"]:
        assert ours.encode(text) == reference.encode(text), text
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (reference.bos_token, reference.eos_token,
                                                                reference.pad_token)
    assert ours.apply_chat_template(CONVERSATION, tokenize=False) == reference.apply_chat_template(
        CONVERSATION, tokenize=False)


def test_gguf_directory_and_override(tmp_path):
    path = default_model_path()
    os.symlink(path, tmp_path / "model.gguf")
    from_directory = load_tokenizer(str(tmp_path))
    assert from_directory.encode("Hello 你好") == load_tokenizer(path).encode("Hello 你好")
    overridden = load_tokenizer("/nonexistent/weights", tokenizer=str(tmp_path))
    assert overridden.chat_template == from_directory.chat_template


def test_hf_directory_round_trip(tmp_path, gguf_tokenizers):
    saved = gguf_tokenizers[0]
    saved.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    for text in TEXTS:
        assert loaded.encode(text) == saved.encode(text)
    assert loaded.chat_template == saved.chat_template
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (saved.bos_token, saved.eos_token,
                                                                      saved.pad_token)


def test_tokenizer_argument_overrides_model_directory(tmp_path, gguf_tokenizers):
    model_dir, tokenizer_dir = tmp_path / "weights", tmp_path / "tokenizer"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"")
    gguf_tokenizers[0].save_pretrained(tokenizer_dir)
    assert load_tokenizer(str(model_dir), tokenizer=str(tokenizer_dir)).encode("hi") == gguf_tokenizers[0].encode("hi")
    with pytest.raises(ValueError, match="no tokenizer found in model="):
        load_tokenizer(str(model_dir))


def test_missing_paths_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model='/nonexistent' does not exist"):
        load_tokenizer("/nonexistent")
    with pytest.raises(FileNotFoundError, match="tokenizer='/nonexistent/tok' does not exist"):
        load_tokenizer(str(tmp_path), tokenizer="/nonexistent/tok")
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(ValueError, match="neither a .gguf file nor a directory"):
        load_tokenizer(str(tmp_path / "notes.txt"))
