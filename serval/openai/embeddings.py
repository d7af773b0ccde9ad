"""The pooling endpoints' wire format (no torch): /v1/embeddings (OpenAI's), /v1/score and /v1/rerank (vLLM's; the
rerank shape is Jina's and Cohere's), their validation, and base64 embeddings as the OpenAI client decodes them.
"""
from __future__ import annotations

import base64
import sys
import time
from array import array
from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import Field, StrictBool, StrictStr, field_validator

from serval.openai.errors import InvalidArgument
from serval.openai.protocol import OpenAIBase, PositiveInt, RequestBody, TokenId

# OpenAI's input forms: a string, strings, a token array, token arrays.
EmbeddingInput = StrictStr | list[StrictStr] | list[TokenId] | list[list[TokenId]]


# OpenAI's bound on an embeddings input array; each item is an engine request, so one body can't queue millions.
MAX_INPUTS = 2048


def _not_empty(value, field: str):
    """Every input must hold something: an empty string or token array has nothing to pool; at most MAX_INPUTS."""
    items = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else value
    if not items:
        raise InvalidArgument(field, f"invalid {field}: it is empty; allowed a string, strings, a token array or "
                                     "token arrays, none of them empty")
    if len(items) > MAX_INPUTS:
        raise InvalidArgument(field, f"invalid {field}: {len(items)} items; at most {MAX_INPUTS} per request")
    for index, item in enumerate(items):
        if len(item) == 0:
            raise InvalidArgument(field, f"invalid {field}: item {index} is empty")
    return value


class EmbeddingRequest(RequestBody):
    model: StrictStr | None = None
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt | None = None
    user: StrictStr | None = None
    # sentence-transformers' named instruction from the model's config (an extension, e.g. "query" for
    # Qwen3-Embedding), put before every string input; None: the config's default prompt, if any.
    prompt_name: StrictStr | None = None

    @field_validator("input")
    @classmethod
    def _check_input(cls, value):
        return _not_empty(value, "input")

    def inputs(self) -> list[str | list[int]]:
        """One item per embedding: a string or a token array."""
        value = self.input
        if isinstance(value, str) or (value and isinstance(value[0], int)):
            return [value]
        return list(value)


class EmbeddingData(OpenAIBase):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(OpenAIBase):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(OpenAIBase):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage


class ScoreRequest(RequestBody):
    model: StrictStr | None = None
    text_1: StrictStr | list[StrictStr]
    text_2: StrictStr | list[StrictStr]
    activation: StrictBool | None = None  # a classifier's sigmoid/softmax (vLLM's); None: on

    @field_validator("text_1", "text_2")
    @classmethod
    def _check_texts(cls, value, info):
        return _not_empty(value, info.field_name)


class ScoreData(OpenAIBase):
    object: Literal["score"] = "score"
    index: int
    score: float


class ScoreResponse(OpenAIBase):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ScoreData]
    usage: EmbeddingUsage


class RerankDocument(OpenAIBase):
    text: StrictStr


class RerankRequest(RequestBody):
    model: StrictStr | None = None
    query: StrictStr
    documents: list[StrictStr | RerankDocument]
    top_n: Annotated[int, Field(strict=True, ge=0)] | None = None  # None or 0: every document
    return_documents: StrictBool = True
    activation: StrictBool | None = None

    @field_validator("query")
    @classmethod
    def _check_query(cls, value):
        return _not_empty(value, "query")

    @field_validator("documents")
    @classmethod
    def _check_documents(cls, value):
        _not_empty([document if isinstance(document, str) else document.text for document in value], "documents")
        return value

    def document_texts(self) -> list[str]:
        return [document if isinstance(document, str) else document.text for document in self.documents]


class RerankResult(OpenAIBase):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankUsage(OpenAIBase):
    total_tokens: int


class RerankResponse(OpenAIBase):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]


def encode_embedding(values: list[float], encoding_format: str) -> list[float] | str:
    """float: the numbers; base64: their float32 little-endian bytes, which the OpenAI client decodes with
    numpy.frombuffer(..., dtype="float32")."""
    if encoding_format == "float":
        return values
    packed = array("f", values)
    if sys.byteorder != "little":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def rerank_results(scores: list[float], documents: list[str], top_n: int | None,
                   return_documents: bool) -> list[RerankResult]:
    """Documents by descending score (ties keep their order), the first top_n (None or 0: all)."""
    order = sorted(range(len(scores)), key=lambda index: -scores[index])
    if top_n:
        order = order[:top_n]
    return [RerankResult(index=index, relevance_score=scores[index],
                         document=RerankDocument(text=documents[index]) if return_documents else None)
            for index in order]


def score_pairs(text_1: str | Sequence[str], text_2: str | Sequence[str]) -> list[tuple[str, str]]:
    """vLLM's pairing: one text_1 against every text_2, or text_1[i] with text_2[i]."""
    firsts = [text_1] if isinstance(text_1, str) else list(text_1)
    seconds = [text_2] if isinstance(text_2, str) else list(text_2)
    if not firsts or not seconds:
        raise InvalidArgument("text_1" if not firsts else "text_2", "invalid input: it is empty")
    if len(firsts) == 1:
        firsts = firsts * len(seconds)
    if len(firsts) != len(seconds):
        raise InvalidArgument("text_2", f"invalid text_2: {len(seconds)} texts for {len(firsts)} text_1; allowed "
                                        "one text_1, or as many as text_2")
    return list(zip(firsts, seconds))
