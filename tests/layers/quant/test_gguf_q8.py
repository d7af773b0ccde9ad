"""serval.layers.quant.gguf_q8: a Q8_0 table kept 8-bit on the CPU, against gguf's own dequantizer: the embedding's
rows equal it exactly, and the LM head's logits equal the float32 matmul with it to bfloat16's precision (the
kernel takes bfloat16 activations and scales and returns bfloat16), its largest ones to float32's."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from serval.layers.embedding import Embedding
from serval.layers.linear import Linear
from serval.layers.quant.gguf_q8 import GGUFQ8HeadMethod

Q = gguf.GGMLQuantizationType
BF16_TOLERANCE = 1e-2  # as tests/layers/quant/test_gguf.py: a few bfloat16 roundings of the largest output


def q8_table(rows: int, k: int, seed: int) -> np.ndarray:
    """Q8_0 data [rows, bytes per row] quantized by gguf from normal weights, with the extremes -127 and 127 in."""
    weights = np.random.default_rng(seed).normal(0, 0.5, size=(rows, k)).astype(np.float32)
    weights[0, :32], weights[1, :32] = 1.0, -1.0  # whole blocks at +-127
    return gguf.quants.quantize(weights, Q.Q8_0)


def packed_head(raw: np.ndarray, rows: int, k: int, tied: Embedding | None = None) -> Linear:
    head = Linear(k, rows, bias=False)
    if tied is not None:  # as the loader ties them: while they share the weight, before the format drops it
        tied.weight = head.weight
        tied.read_rows_from(head)
    head.set_quant_method(GGUFQ8HeadMethod())
    head.quant_method.load(head, None, "gguf_blocks", torch.from_numpy(raw), "lm_head.gguf_blocks")
    head.quant_method.finish(head, "lm_head")
    return head


def dequantized(raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, Q.Q8_0).astype(np.float32))


@pytest.mark.parametrize("rows,k", [(64, 32), (192, 576)])
def test_tied_embedding_reads_the_dequantized_rows_exactly(rows, k):
    raw = q8_table(rows, k, seed=rows)
    embedding = Embedding(rows, k)
    head = packed_head(raw, rows, k, tied=embedding)
    ids = torch.tensor([[0, 1, 31, 32], [33, 63, rows - 1, 5]])
    assert embedding.weight is None and head.weight is None
    assert torch.equal(embedding(ids), dequantized(raw)[ids])


@pytest.mark.parametrize("batch", [1, 16])
def test_head_logits_equal_the_dequantized_matmul(batch):
    rows, k = 256, 576
    raw = q8_table(rows, k, seed=7)
    head = packed_head(raw, rows, k)
    x = torch.randn(batch, k, generator=torch.Generator().manual_seed(batch))
    expected = x @ dequantized(raw).t()
    logits = head(x)
    torch.testing.assert_close(logits, expected, rtol=0, atol=BF16_TOLERANCE * float(expected.abs().max()))
    # Each row's largest logits are computed again in float32: the top ones are the float32 head's.
    top = expected.topk(2, dim=-1).indices
    torch.testing.assert_close(logits.gather(-1, top), expected.gather(-1, top), rtol=1e-5, atol=1e-5)
    # 1.25 bytes a weight (nibbles, bfloat16 scale and zero per 32) plus the float16 scales the rows are read with
    held = sum(t.nbytes for t in head.buffers())
    assert held == rows * k * 5 // 4 + rows * k // 32 * 2


def test_a_table_the_format_cannot_hold_is_refused_by_name():
    with pytest.raises(ValueError, match=r"gguf Q8_0: a 100 x 64 layer does not fit"):
        Linear(64, 100, bias=False).set_quant_method(GGUFQ8HeadMethod())
    head = Linear(64, 64, bias=False)
    head.set_quant_method(GGUFQ8HeadMethod())
    with pytest.raises(ValueError, match="holds 4 blocks; the layer expects 128"):
        head.quant_method.load(head, None, "gguf_blocks", torch.from_numpy(q8_table(2, 64, 0)), "lm_head.gguf_blocks")
