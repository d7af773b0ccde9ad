"""Greedy sampling's argmax over the vocabulary, as one kernel of many programs.

torch.argmax of one 128k-entry row ran as a single thread block on the H200: 27 us a token at batch 1, longer
than any kernel of a decoder layer. Here the row is cut into chunks, a program each; every program keeps its
chunk's maximum and first index, and the last to finish picks the first index of the largest, so ties go to the
lowest token id as torch's do. NaN counts as the largest value, as in torch.

The last program, without a second kernel (whose launch would cost about what the work does): each program stores
its chunk's pair, passes a barrier (every thread's stores before it), then adds 1 to its row's counter (acq_rel:
the release publishes the stores); the one that reads chunks - 1 is the last, its acquire makes every pair visible,
it puts the counter back to 0 for the next launch (a replayed graph's too) and reads the pairs, skipping L1, in
chunk order. The counters are one int32 buffer per device, allocated on first use outside any graph capture (the
engines' warm-up samples first) and never replaced, since captured graphs hold its address; launches on one stream
never overlap (each waits, by PDL or stream order, for the one before).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from serval.kernels import pdl

_BLOCK = 4096
_COUNTERS_SIZE = 1 << 16
_counters: dict[torch.device, torch.Tensor] = {}


def row_counters(device: torch.device, rows: int) -> torch.Tensor | None:
    """The device's int32 counters, all 0; None (torch.argmax runs instead) past _COUNTERS_SIZE rows or when the
    first use comes inside a graph capture."""
    if rows > _COUNTERS_SIZE:
        return None
    counters = _counters.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counters = _counters[device] = torch.zeros(_COUNTERS_SIZE, dtype=torch.int32, device=device)
    return counters


@triton.jit
def _argmax_kernel(logits_ptr, stride_row, vocab_size, chunk_max_ptr, chunk_index_ptr, out_ptr, counters_ptr,
                   BLOCK: tl.constexpr, CHUNKS_PAD: tl.constexpr, USE_PDL: tl.constexpr):
    pdl.wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(logits_ptr + row * stride_row + cols, mask=cols < vocab_size, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)
    largest, index = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(chunk_max_ptr + row * num_chunks + chunk, largest)
    tl.store(chunk_index_ptr + row * num_chunks + chunk, chunk * BLOCK + index)
    tl.debug_barrier()
    if tl.atomic_add(counters_ptr + row, 1, sem="acq_rel") == num_chunks - 1:
        tl.atomic_xchg(counters_ptr + row, 0)
        chunks = tl.arange(0, CHUNKS_PAD)
        valid = chunks < num_chunks
        maxima = tl.load(chunk_max_ptr + row * num_chunks + chunks, mask=valid, other=float("-inf"),
                         cache_modifier=".cg")
        indices = tl.load(chunk_index_ptr + row * num_chunks + chunks, mask=valid, other=0, cache_modifier=".cg")
        best = tl.max(maxima, 0)
        first = tl.min(tl.where(valid & (maxima == best), indices, vocab_size), 0)
        tl.store(out_ptr + row, first.to(tl.int64))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [rows, vocab] (any float dtype, last dim contiguous) -> int64 [rows], torch.argmax(dim=-1)'s answer.
    Runs torch.argmax where no counters are to be had (row_counters)."""
    rows, vocab_size = logits.shape
    counters = row_counters(logits.device, rows) if rows and logits.stride(-1) == 1 else None
    if counters is None:
        return logits.argmax(dim=-1)
    num_chunks = triton.cdiv(vocab_size, _BLOCK)
    chunk_max = torch.empty((rows, num_chunks), dtype=torch.float32, device=logits.device)
    chunk_index = torch.empty((rows, num_chunks), dtype=torch.int32, device=logits.device)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    _argmax_kernel[(rows, num_chunks)](
        logits, logits.stride(0), vocab_size, chunk_max, chunk_index, out, counters, BLOCK=_BLOCK,
        CHUNKS_PAD=triton.next_power_of_2(num_chunks), num_warps=8, **pdl.launch_options(logits))
    return out
