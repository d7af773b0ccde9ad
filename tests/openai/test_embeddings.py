"""The pooling endpoints' wire format: base64 as the openai client decodes it, the bodies' validation (OpenAI's
error fields), score pairing and rerank ordering."""
from __future__ import annotations

import base64

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from serval.openai.embeddings import EmbeddingRequest, RerankRequest, ScoreRequest, encode_embedding, \
    rerank_results, score_pairs
from serval.openai.errors import APIError, InvalidArgument

floats32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@given(st.lists(floats32, max_size=64))
def test_base64_is_float32_little_endian_as_the_openai_client_reads_it(values):
    encoded = encode_embedding(values, "base64")
    # What openai's embeddings resource does with a base64 answer.
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="float32").tolist()
    assert decoded == values
    assert encode_embedding(values, "float") is values


@pytest.mark.parametrize("value, expected", [
    ("one", ["one"]), (["a", "b"], ["a", "b"]), ([1, 2, 3], [[1, 2, 3]]), ([[1], [2, 3]], [[1], [2, 3]])])
def test_every_openai_input_form(value, expected):
    assert EmbeddingRequest.model_validate({"input": value}).inputs() == expected


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"), ({"input": []}, "input"), ({"input": ["a", ""]}, "input"),
    ({"input": [[1], []]}, "input"),
    ({"input": [-1]}, "input"), ({"input": [True]}, "input"), ({}, "input"),
    ({"input": "a", "dimensions": 0}, "dimensions"), ({"input": "a", "encoding_format": "hex"}, "encoding_format"),
    ({"input": ["a"] * 2049}, "input"), ({"input": [[1]] * 2049}, "input"),  # OpenAI's 2048 items at most
])
def test_bad_embedding_bodies_name_the_field(body, param):
    with pytest.raises(ValidationError) as caught:
        EmbeddingRequest.model_validate(body)
    error = APIError.from_validation_error(caught.value)
    assert error.status == 400 and error.param == param


def test_the_largest_input_array_is_accepted():
    assert len(EmbeddingRequest.model_validate({"input": ["a"] * 2048}).inputs()) == 2048


def test_score_and_rerank_bodies():
    assert ScoreRequest.model_validate({"text_1": "q", "text_2": ["a", "b"]}).text_2 == ["a", "b"]
    rerank = RerankRequest.model_validate({"query": "q", "documents": ["a", {"text": "b"}]})
    assert rerank.document_texts() == ["a", "b"] and rerank.return_documents and rerank.top_n is None
    for body, param in (({"text_1": [], "text_2": "a"}, "text_1"), ({"text_1": "q", "text_2": ""}, "text_2")):
        with pytest.raises(ValidationError) as caught:
            ScoreRequest.model_validate(body)
        assert APIError.from_validation_error(caught.value).param == param


def test_score_pairs_one_against_many_or_pairwise():
    assert score_pairs("q", ["a", "b"]) == [("q", "a"), ("q", "b")]
    assert score_pairs(["q", "r"], ["a", "b"]) == [("q", "a"), ("r", "b")]
    with pytest.raises(InvalidArgument) as caught:
        score_pairs(["q", "r"], ["a", "b", "c"])
    assert caught.value.param == "text_2"


def test_rerank_results_sort_by_score_cut_at_top_n_and_keep_tied_order():
    scores = [0.1, 0.9, 0.5, 0.9]
    results = rerank_results(scores, ["a", "b", "c", "d"], top_n=3, return_documents=True)
    assert [(r.index, r.relevance_score, r.document.text) for r in results] == [(1, 0.9, "b"), (3, 0.9, "d"),
                                                                                (2, 0.5, "c")]
    bare = rerank_results(scores, ["a", "b", "c", "d"], top_n=0, return_documents=False)
    assert [r.index for r in bare] == [1, 3, 2, 0] and all(r.document is None for r in bare)
