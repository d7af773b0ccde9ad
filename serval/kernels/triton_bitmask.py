"""Structured outputs' token mask applied to the logits in one kernel: logits[r, t] = -inf where bit t of row r's
int32 bitmask is 0 (bit j of word w stands for token 32*w + j, as llguidance fills it), and for tokens past the
bitmask's width (embedding rows beyond the tokenizer's vocabulary).

Why a kernel: unpacking the words into a boolean mask and filling takes four torch calls on the engine thread,
and on a GPU server every torch call releases the GIL, which the event loop (streaming to hundreds of clients)
may hold for a switch interval before handing it back. One launch replaces them. The torch reference is
serval.engine.structured_output.disallowed_mask with masked_fill (what the CPU runs); tests compare the two in
Triton's interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024  # tokens per program: 32 words of the bitmask


@triton.jit
def _apply_bitmask_kernel(logits_ptr, bitmask_ptr, row_index_ptr, vocab_size, num_words, logits_stride,
                          bitmask_stride, HAS_ROW_INDEX: tl.constexpr, BLOCK: tl.constexpr):
    row, block = tl.program_id(0), tl.program_id(1)
    logits_row = tl.load(row_index_ptr + row).to(tl.int64) if HAS_ROW_INDEX else row.to(tl.int64)
    tokens = block * BLOCK + tl.arange(0, BLOCK)
    in_vocab = tokens < vocab_size
    words = tokens // 32
    word = tl.load(bitmask_ptr + row.to(tl.int64) * bitmask_stride + words, mask=in_vocab & (words < num_words),
                   other=0)
    allowed = ((word >> (tokens % 32)) & 1) != 0
    tl.store(logits_ptr + logits_row * logits_stride + tokens, float("-inf"), mask=in_vocab & ~allowed)


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """In place: logits [B, V] (float), bitmask int32 [R, words] on logits' device; row i of the bitmask masks
    logits row rows[i] (rows int64 [R] on the device), or row i when rows is None (then R == B)."""
    num_rows = bitmask.shape[0]
    if num_rows == 0:
        return
    vocab_size = logits.shape[1]
    grid = (num_rows, triton.cdiv(vocab_size, _BLOCK))
    _apply_bitmask_kernel[grid](logits, bitmask, rows if rows is not None else bitmask, vocab_size,
                                bitmask.shape[1], logits.stride(0), bitmask.stride(0),
                                HAS_ROW_INDEX=rows is not None, BLOCK=_BLOCK)
