"""serval.model.gguf_reader against the gguf package's GGUFReader on the default model's file: every metadata
value and every tensor's type, shape and bytes."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from serval.model.default_model import default_model_path
from serval.model.gguf_reader import StringArray, read_gguf_file


@pytest.fixture(scope="module")
def reference() -> gguf.GGUFReader:
    return gguf.GGUFReader(default_model_path())


def test_metadata_and_tensors_equal_gguf_reader(reference):
    ours = read_gguf_file(default_model_path())
    expected = {name: field.contents() for name, field in reference.fields.items() if not name.startswith("GGUF.")}
    assert sorted(ours.metadata) == sorted(expected)
    for name, value in expected.items():
        actual = ours.metadata[name]
        assert (actual.tolist() if isinstance(actual, np.ndarray) else actual) == value, name
    assert list(ours.tensors) == [tensor.name for tensor in reference.tensors]
    for tensor in reference.tensors:
        mine = ours.tensors[tensor.name]
        assert mine.tensor_type == int(tensor.tensor_type) and mine.shape == tuple(int(d) for d in tensor.shape)
        assert mine.data.dtype == tensor.data.dtype and np.array_equal(mine.data, tensor.data), tensor.name


def test_without_decoding_strings_arrays_keep_their_length(reference):
    ours = read_gguf_file(default_model_path(), decode_strings=False)
    tokens = ours.metadata["tokenizer.ggml.tokens"]
    assert isinstance(tokens, StringArray) and len(tokens) == len(reference.fields["tokenizer.ggml.tokens"].data)
    assert ours.metadata["tokenizer.chat_template"] == reference.fields["tokenizer.chat_template"].contents()


def test_not_a_gguf_file_is_named(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGML" + bytes(64))
    with pytest.raises(ValueError, match="is not a GGUF file"):
        read_gguf_file(str(path))
