"""Pooling fed chunk by chunk equals pooling the whole prompt's hidden states at once (the torch reference: last
row, mean of rows, first row); normalisation and Matryoshka truncation."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from serval.layers.pooling import PooledRows, PoolerConfig, normalize, truncate_dimensions

REFERENCE = {"LAST": lambda hidden: hidden[-1], "MEAN": lambda hidden: hidden.mean(dim=0),
             "CLS": lambda hidden: hidden[0]}


def _pool_in_chunks(pooling_type: str, hidden: torch.Tensor, chunk_sizes: list[int]) -> torch.Tensor:
    rows = PooledRows(pooling_type, len(hidden))
    start = 0
    for size in chunk_sizes:
        rows.add(hidden[start:start + size], start)
        start += size
    return rows.pooled()


@settings(max_examples=60, deadline=None)
@given(pooling_type=st.sampled_from(sorted(REFERENCE)), cuts=st.lists(st.integers(1, 9), min_size=1, max_size=6),
       seed=st.integers(0, 1000))
def test_chunked_pooling_equals_the_whole_prompt(pooling_type, cuts, seed):
    hidden = torch.randn(sum(cuts), 8, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(_pool_in_chunks(pooling_type, hidden, cuts), REFERENCE[pooling_type](hidden))


@pytest.mark.parametrize("pooling_type", sorted(REFERENCE))
def test_a_chunk_at_position_zero_starts_over(pooling_type):
    """A preempted request is recomputed from position 0: what its first attempt added is forgotten."""
    hidden = torch.randn(10, 4)
    rows = PooledRows(pooling_type, 10)
    rows.add(torch.randn(6, 4), 0)  # the first attempt, preempted after one chunk
    rows.add(hidden[:7], 0)
    rows.add(hidden[7:], 7)
    torch.testing.assert_close(rows.pooled(), REFERENCE[pooling_type](hidden))


def test_half_precision_rows_pool_in_float32():
    hidden = torch.randn(300, 16, dtype=torch.float64)
    pooled = _pool_in_chunks("MEAN", hidden.to(torch.bfloat16), [100, 100, 100])
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled.double(), hidden.to(torch.bfloat16).double().mean(dim=0), atol=1e-6, rtol=0)


def test_reading_before_every_position_is_in_raises():
    rows = PooledRows("MEAN", 5)
    rows.add(torch.randn(3, 4), 0)
    with pytest.raises(RuntimeError, match="before every position"):
        rows.pooled()
    last = PooledRows("LAST", 5)
    last.add(torch.randn(3, 4), 0)
    with pytest.raises(RuntimeError):
        last.pooled()


def test_matryoshka_truncation_renormalises_only_a_normalised_output():
    vector = torch.tensor([3.0, 4.0, 12.0])
    unit = normalize(vector)
    torch.testing.assert_close(unit, vector / 13.0)
    torch.testing.assert_close(truncate_dimensions(unit, 2, renormalize=True), torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(truncate_dimensions(vector, 2, renormalize=False), torch.tensor([3.0, 4.0]))
    assert truncate_dimensions(vector, None, renormalize=True) is vector
    assert truncate_dimensions(vector, 3, renormalize=True) is vector
    torch.testing.assert_close(normalize(torch.zeros(3)), torch.zeros(3))


def test_pooler_config_refuses_an_unknown_type():
    with pytest.raises(ValueError, match="MAX"):
        PoolerConfig("MAX")
