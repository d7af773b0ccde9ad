"""The argmax kernel against torch.argmax, on the interpreter here and compiled on a GPU: ties (lowest id), rows
of -inf (a grammar that masked everything), NaN, vocabularies that do not fill the last chunk, strided rows."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from serval.kernels import triton_argmax  # noqa: E402
from serval.kernels.triton_argmax import argmax  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("vocab_size", [7, 4096, 4097, 32000, 128256])
def test_argmax_equals_torch(vocab_size):
    torch.manual_seed(vocab_size)
    logits = torch.randn(5, vocab_size, device=DEVICE)
    logits[1, vocab_size // 3] = logits[1, vocab_size - 1] = logits[1].max() + 1  # a tie across chunks
    logits[2] = float("-inf")
    logits[3, ::3] = 2.0 * logits.abs().max()  # ties inside each chunk
    logits[4, vocab_size - 1] = float("nan")
    expected = logits.argmax(dim=-1)
    got = argmax(logits)
    assert got.dtype == torch.int64 and torch.equal(got, expected)
    assert torch.equal(argmax(logits), expected)  # the counters were left at 0
    assert not triton_argmax.row_counters(logits.device, 1).any()


def test_argmax_reads_bfloat16_and_strided_rows():
    torch.manual_seed(1)
    wide = torch.randn(3, 2 * 5000, device=DEVICE).to(torch.bfloat16)
    rows = wide[:, :5000]
    assert torch.equal(argmax(rows), rows.argmax(dim=-1))


def test_argmax_of_more_rows_than_counters_falls_back_to_torch(monkeypatch):
    monkeypatch.setattr(triton_argmax, "_COUNTERS_SIZE", 2)
    logits = torch.randn(3, 100, device=DEVICE)
    assert torch.equal(argmax(logits), logits.argmax(dim=-1))
