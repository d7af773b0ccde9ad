"""Pooling: a request's hidden states -> one vector (last token, mean, or first/CLS), then normalisation and
Matryoshka truncation.

A prompt may be prefilled over several steps (chunked prefill), so pooling is a running reduction: each chunk of
rows updates a PooledRows, and `pooled` reads the vector once the last chunk is in. Only what the pooling type
needs is kept: one row for last/CLS, a float32 sum for mean (hidden states of the whole prompt are never held).

    positions: 0 ............................................ n-1
    chunks:    [ step 1 rows ][ step 2 rows ][ step 3 rows ]
    CLS keeps row 0; LAST keeps row n-1; MEAN adds every row in float32 and divides by n.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch

POOLING_TYPES = ("LAST", "MEAN", "CLS")


@dataclass(frozen=True)
class PoolerConfig:
    """How a model turns hidden states into its output (vLLM's --pooler-config fields)."""
    pooling_type: str = "LAST"
    normalize: bool = True  # L2-normalise the pooled vector (embedders); classifiers leave it off

    def __post_init__(self) -> None:
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type {self.pooling_type!r} is not supported; allowed {list(POOLING_TYPES)}")


def parse_pooler_overrides(value: str | dict | None) -> dict:
    """vLLM's --pooler-config (a JSON object, or a dict from Python) as PoolerConfig fields; ValueError says what
    is wrong."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"not JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError("allowed a JSON object such as {\"pooling_type\": \"MEAN\", \"normalize\": true}")
    fields = {field.name for field in dataclasses.fields(PoolerConfig)}
    unknown = sorted(set(value) - fields)
    if unknown:
        raise ValueError(f"unknown keys {unknown}; allowed {sorted(fields)}")
    overrides = dict(value)
    if "pooling_type" in overrides:
        if not isinstance(overrides["pooling_type"], str) or overrides["pooling_type"].upper() not in POOLING_TYPES:
            raise ValueError(f"pooling_type {overrides['pooling_type']!r}: allowed {list(POOLING_TYPES)}")
        overrides["pooling_type"] = overrides["pooling_type"].upper()
    if "normalize" in overrides and not isinstance(overrides["normalize"], bool):
        raise ValueError(f"normalize {overrides['normalize']!r}: allowed true or false")
    return overrides


@dataclass
class PooledRows:
    """The running reduction of one prompt's hidden states, fed chunk by chunk in position order."""
    pooling_type: str
    num_positions: int  # the prompt's length: the last position is num_positions - 1
    vector: torch.Tensor | None = None  # the kept row (LAST, CLS) or the float32 sum (MEAN)
    num_rows: int = 0  # rows added (MEAN)

    def add(self, rows: torch.Tensor, start_position: int) -> None:
        """rows [k, hidden]: the hidden states of positions start_position .. start_position + k - 1. A chunk at
        position 0 starts over (a preempted request is recomputed from the beginning)."""
        if start_position == 0:
            self.vector, self.num_rows = None, 0
        end_position = start_position + len(rows)
        if self.pooling_type == "LAST":
            if end_position == self.num_positions:
                self.vector = rows[-1]  # read in this same step (the last chunk completes the request)
        elif self.pooling_type == "CLS":
            if start_position == 0:
                self.vector = rows[0].clone()  # a view would keep the whole step's hidden states alive
        else:
            chunk_sum = rows.sum(dim=0, dtype=torch.float32)
            self.vector = chunk_sum if self.vector is None else self.vector + chunk_sum
            self.num_rows += len(rows)

    def pooled(self) -> torch.Tensor:
        """The pooled vector [hidden] in float32; every position must have been added (for MEAN: once each)."""
        if self.vector is None or (self.pooling_type == "MEAN" and self.num_rows != self.num_positions):
            raise RuntimeError(f"{self.pooling_type} pooling read before every position of the prompt was added")
        if self.pooling_type == "MEAN":
            return self.vector / self.num_rows
        return self.vector.float()


def normalize(vectors: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dimension (a zero vector stays zero)."""
    return torch.nn.functional.normalize(vectors.float(), p=2.0, dim=-1)


def truncate_dimensions(vector: torch.Tensor, dimensions: int | None, renormalize: bool) -> torch.Tensor:
    """A Matryoshka model's first `dimensions` components, L2-normalised again when the model's output is (the
    prefix of a unit vector is not one)."""
    if dimensions is None or dimensions >= vector.shape[-1]:
        return vector
    prefix = vector[..., :dimensions]
    return normalize(prefix) if renormalize else prefix
