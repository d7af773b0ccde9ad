"""The W4A16 split-K decode GEMV: y [M, N] = x [M, K] @ W for 1 to 4 rows of x, W in serval.kernels.triton_w4a16's
packed layout with its groups in order (AWQ, GPTQ without act-order, compressed-tensors; g_idx = k // GROUP).

    grid (N / BLOCK_N column blocks) x (SPLIT_K slices of K)   >= 4 programs a SM even for N = 4096
    program: BLOCK_N columns, all rows (1..4) at once, K slice in BLOCK_K steps, two tiles an iteration, each
             loaded while the other is used; BLOCK_K divides the group, so one scale and zero per tile and column
    x:       (16-bit x) first staged by the program as float16, scaled by a power of two into [-1, 1)
    weight:  (16-bit x) a byte of two adjacent columns' words per prmt, a nibble of each into the mantissa of the
             float16 1024 per lop3, the zero point off both by one f16x2 add (or FMA), then one f16x2 FMA per row:
             two weights an instruction from unpacking to product; a tile's products summed in float16, then
             scaled into a float32 sum. sm_90 SASS: about 2.3 instructions a weight at one row (4.5 before).
             (float32 x) nibble -> float32 by a mask into a power of two's mantissa, one FMA per row.
    reduce:  each slice writes its partial; the column block's last program adds them (a counter it resets)
Without split-K, 32 to 224 programs of a few warps walked K serially and read the H200's memory at 0.5 to 1.2
TB/s (docs/performance.md). docs/quantization.md has the design and the instruction counts; the torch reference is
serval.kernels.triton_w4a16.reference_linear.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from serval.kernels import pdl


class SplitKConfig(NamedTuple):
    """The split-K GEMV's knobs, in a device table's order. split_k 0: chosen from the GPU's SM count."""
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


# split_k 0 aims at this many warps per SM (each with one tile in use and one in flight, enough to cover HBM's
# latency) and at least PROGRAMS_PER_SM programs (a program's staging of x and its last tile's wait are spent
# once; other programs on the SM read meanwhile), with slices of at least MIN_SLICE_K rows of K: the partial sums
# (8 bytes a column and slice, written and read back from L2) stay under an eighth of the weights' bytes. Llama-3-8B's
# o projection (N = K = 4096) at 128 columns a program: 32 column blocks x 32 slices, 7.8 programs a SM of 132.
WARPS_PER_SM = 8
PROGRAMS_PER_SM = 4
MIN_SLICE_K = 128
# A column block's arrival counter lives in a per-device buffer of this many (launches with more blocks don't split).
MAX_COLUMN_BLOCKS = 1 << 16
# Rows x BLOCK_K of the split-K GEMV's tiles of products, at most, for 2 to 4 rows (gemv_block_k).
MAX_ROWS_X_BLOCK_K = 128
# The last program of a column block reads the slices' partial sums this many a load (a constant, not
# the launch's slice count: fewer kernels to compile, and the masked loads past the count cost nothing).
PARTIALS_PER_LOAD = 16
# The split-K GEMV stages x (16-bit activations) in chunks of at most this many values a load, and at least
# X_STAGE_MIN (one compiled kernel for all short slices).
X_STAGE_CHUNK = 2048
X_STAGE_MIN = 256

@triton.jit
def _packed_tile(word_ptrs, scales_ptr, zeros_ptr, k, cols, col_ok, N, GROUP: tl.constexpr):
    """The words at word_ptrs, W[k:k+BLOCK_K, cols] ([BLOCK_K/8, BLOCK_N] int32, read once: not worth keeping in
    L2), and the scale and zero point of the one group they lie in. Words masked off are left undefined (no
    registers zeroed first): they only ever meet their own columns, which are not stored, or a tile past the slice's
    last, which is not used."""
    words = tl.load(word_ptrs, mask=col_ok[None, :], eviction_policy="evict_first")
    group = k // GROUP
    scale = tl.load(scales_ptr + group * N + cols, mask=col_ok, other=0.0).to(tl.float32)
    zero = tl.load(zeros_ptr + group * N + cols, mask=col_ok, other=0).to(tl.float32)
    return words, scale, zero


@triton.jit
def _nibble_floats(words, zero, j: tl.constexpr, USE_ASM: tl.constexpr):
    """q - z of nibble j (0..3) of each word, as float32, exactly, with no conversion instruction (int-to-float
    runs at a quarter of the FMA rate: a 4-bit GEMV would be bound by it). Masked in place and OR-ed into the
    mantissa of 2^(23-4j), whose unit in the last place is 16^-j, the nibble is the float 2^(23-4j) + q; subtracting
    2^(23-4j) + z leaves q - z. One logic op (lop3, AND then OR) and one add per weight."""
    mask = 0xF << (4 * j)
    magic = 0x4B000000 - j * 0x2000000  # the bits of the float 2^(23-4j)
    if USE_ASM:  # LLVM splits the AND-OR into two logic ops (or a bit-field extract): one lop3 instead
        bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,n,n",
                                         [words, mask, magic], dtype=tl.int32, is_pure=True, pack=1)
    else:
        bits = (words & mask) | magic
    return bits.to(tl.float32, bitcast=True) - (zero + (1 << (23 - 4 * j)))[None, :]


@triton.jit
def _add_row_products(tile, low, high, x_words, row, stride_x, j: tl.constexpr):
    """tile + (q - z)[8i + j] x[row, 8i + j] + (q - z)[8i + j + 4] x[row, 8i + j + 4] for each word i: two FMAs."""
    tile += low * tl.load(x_words + row * stride_x + j).to(tl.float32)[:, None]
    tile += high * tl.load(x_words + row * stride_x + (j + 4)).to(tl.float32)[:, None]
    return tile


@triton.jit
def _finish_row(acc, row, y_ptr, partial_ptr, pid_k, cols, col_ok, M, N, SPLIT: tl.constexpr):
    """Row row's sum over the program's slice of K: into y, or with split-K into the slice's partial sums."""
    if SPLIT:
        tl.store(partial_ptr + (pid_k * M + row) * N + cols, acc, mask=col_ok)
    else:
        tl.store(y_ptr + row * N + cols, acc.to(y_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _byte_weights(words, low_bias, high_bias, byte: tl.constexpr, USE_ASM: tl.constexpr):
    """q - z of nibbles 2 byte and 2 byte + 1 of each word as float16, exactly, with no int-to-float conversion:
    the nibble masked into the mantissa of 1024 (0x6400, one unit a step) is the float16 1024 + q, less
    low_bias = 1024 + z; the one above it is 1024 + 16 q, times 1/16 less high_bias = 64 + z (one FMA). A nibble
    at bits 8..11 would reach the exponent, so each byte is taken on its own. On the GPU, two adjacent words
    (columns) at a time, kept as two float16 in one register all the way through the products: one prmt puts the
    byte of each in a 16-bit lane, one lop3 (AND then OR) a nibble, one f16x2 add or FMA the zero point."""
    if USE_ASM:
        # Operands: $0 $1 out; float16 pairs one register each ($2 1/16, $5 low_bias, $6 high_bias), words one each
        # ($3 $4: two columns); the selector puts byte `byte` of $3 in bits 0..7, of $4 in 16..23.
        selector: tl.constexpr = byte | ((4 + byte) << 8)
        low, high = tl.inline_asm_elementwise(
            "{ .reg .b32 t, u, v; prmt.b32 t, $3, $4, $7; "
            "lop3.b32 u, t, 0x000F000F, 0x64006400, 0xEA; sub.f16x2 $0, u, $5; "
            "lop3.b32 v, t, 0x00F000F0, 0x64006400, 0xEA; fma.rn.f16x2 $1, v, $2, $6; }",
            "=r,=r,r,r,r,r,r,n,n", [tl.full(words.shape, 0.0625, tl.float16), words, low_bias, high_bias,
                                          selector],
            dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
    else:  # the interpreter: the same numbers by arithmetic
        low = ((words >> (8 * byte)) & 0xF).to(tl.float16) + 1024.0 - low_bias
        high = (((words >> (8 * byte + 4)) & 0xF).to(tl.float16) * 16.0 + 1024.0) * 0.0625 + high_bias
    return low, high


@triton.jit
def _fma_half(a, b, c, USE_ASM: tl.constexpr):
    """a b + c in float16; on the GPU two elements (adjacent columns) an instruction."""
    if USE_ASM:
        return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.float16,
                                         is_pure=True, pack=2)
    return a * b + c


@triton.jit
def _stage_half_x(x_ptr, stage_ptr, stride_x, row, k_begin, slice_len, BLOCK_K: tl.constexpr,
                  X_CHUNK: tl.constexpr):
    """Row row of x over the program's slice of K, scaled by a power of two into [-1, 1) and stored as float16 at
    stage_ptr, each tile's values nibble-major (x[k + 8i + j] at j * BLOCK_K/8 + i), so the tile loop reads the
    values that meet nibble j of its words as one vector. Returns the inverse power of two, which the row's sum is
    multiplied by at the end. The scale keeps float16 products in range (|x| may be far past 65504 / 15); being a
    power of two, bfloat16 values stay exact (8 bits of mantissa in float16's 11), short of float16's subnormals."""
    words_per_tile: tl.constexpr = BLOCK_K // 8
    amax = tl.zeros((), dtype=tl.float32)
    for first in range(0, slice_len, X_CHUNK):
        offsets = first + tl.arange(0, X_CHUNK)
        x = tl.load(x_ptr + row * stride_x + k_begin + offsets, mask=offsets < slice_len, other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=0))
    # amax lies in [2^(e-127), 2^(e-126)) for its exponent field e: scaling by 2^(126-e) puts it in [0.5, 1).
    exponent = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    scale_field = tl.minimum(tl.maximum(253 - exponent, 1), 253)
    scale = (scale_field << 23).to(tl.float32, bitcast=True)
    for first in range(0, slice_len, X_CHUNK):
        offsets = first + tl.arange(0, X_CHUNK)
        x = tl.load(x_ptr + row * stride_x + k_begin + offsets, mask=offsets < slice_len, other=0.0)
        in_tile = offsets & (BLOCK_K - 1)  # BLOCK_K is a power of two
        staged = offsets - in_tile + (in_tile & 7) * words_per_tile + (in_tile >> 3)
        tl.store(stage_ptr + staged, (x.to(tl.float32) * scale).to(tl.float16), mask=offsets < slice_len)
    return ((254 - scale_field) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _add_half_row_products(tile, low, high, stage_ptr, byte: tl.constexpr, WORDS: tl.constexpr,
                           USE_ASM: tl.constexpr):
    """tile + (q - z) x for nibbles 2 byte and 2 byte + 1 of each word, in float16 (two weights an instruction)."""
    x_low = tl.load(stage_ptr + (2 * byte) * WORDS + tl.arange(0, WORDS))
    x_high = tl.load(stage_ptr + (2 * byte + 1) * WORDS + tl.arange(0, WORDS))
    tile = _fma_half(low, tl.broadcast_to(x_low[:, None], low.shape), tile, USE_ASM)
    return _fma_half(high, tl.broadcast_to(x_high[:, None], high.shape), tile, USE_ASM)


@triton.jit
def _half_tile_sum(tile, scale):
    """A row's float16 tile of products summed over K (in float16: at most 15 x BLOCK_K in size, |x| < 1), then
    scaled in float32."""
    return tl.sum(tile, axis=0).to(tl.float32) * scale


@triton.jit
def _half_tile_sums(words, scale, zero, staged, K_PER_SPLIT, ROWS: tl.constexpr, WORDS: tl.constexpr,
                    USE_ASM: tl.constexpr):
    """Each row's sum over one tile of its products with W, in float32 per column (0 for rows past ROWS): the
    products in float16 (_byte_weights, _add_half_row_products), with x staged at staged (a row every K_PER_SPLIT)."""
    low_bias = tl.broadcast_to((1024.0 + zero).to(tl.float16)[None, :], words.shape)
    high_bias = tl.broadcast_to((-64.0 - zero).to(tl.float16)[None, :], words.shape)
    tile0 = tl.zeros(words.shape, dtype=tl.float16)
    tile1 = tl.zeros(words.shape, dtype=tl.float16)
    tile2 = tl.zeros(words.shape, dtype=tl.float16)
    tile3 = tl.zeros(words.shape, dtype=tl.float16)
    for byte in tl.static_range(4):
        low, high = _byte_weights(words, low_bias, high_bias, byte, USE_ASM)
        tile0 = _add_half_row_products(tile0, low, high, staged, byte, WORDS, USE_ASM)
        if ROWS > 1:
            tile1 = _add_half_row_products(tile1, low, high, staged + K_PER_SPLIT, byte, WORDS, USE_ASM)
        if ROWS > 2:
            tile2 = _add_half_row_products(tile2, low, high, staged + 2 * K_PER_SPLIT, byte, WORDS, USE_ASM)
        if ROWS > 3:
            tile3 = _add_half_row_products(tile3, low, high, staged + 3 * K_PER_SPLIT, byte, WORDS, USE_ASM)
    return (_half_tile_sum(tile0, scale), _half_tile_sum(tile1, scale), _half_tile_sum(tile2, scale),
            _half_tile_sum(tile3, scale))


@triton.jit
def _w4a16_split_k_gemv_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, y_ptr, partial_ptr, counter_ptr,
                               stage_ptr, M, N, K, stride_x, K_PER_SPLIT, num_slices, SPLIT: tl.constexpr,
                               GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr, SLICE_CHUNK: tl.constexpr, HALF: tl.constexpr,
                               X_CHUNK: tl.constexpr, USE_ASM: tl.constexpr, USE_PDL: tl.constexpr):
    # Program (n, s) owns BLOCK_N columns for each of the ROWS (1 to 4) rows of x and the s-th slice of K: a decode
    # projection has only N / BLOCK_N column blocks, too few programs to keep a GPU's loads in flight, so K is split
    # too (split-K). BLOCK_K divides the group, so a tile has one scale and zero per column: the tile's sum over K
    # is scaled once. With BLOCK_N = 128 x num_warps (or 256 x), a thread holds whole columns of the tile (four
    # words wide, one 16-byte load a row), so that sum stays in the thread. Each row has its own accumulator; rows
    # past ROWS compile away. The slices' partial sums go to partial_ptr; the last program of a column block to
    # finish (counted in counter_ptr, which it sets back to 0 for the next launch) adds them in slice order and
    # writes y: one kernel, no zeroed buffer, deterministic.
    # HALF (x in bfloat16 or float16): the products are float16, two to an instruction, summed in float16 over a
    # tile; x is staged first (_stage_half_x). Otherwise (float32 x) every weight is a float32 FMA.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    k_last = k_end - BLOCK_K
    # W is no earlier kernel's output: its first tile is read before waiting for the previous kernel (pdl).
    # The words' addresses step by BLOCK_K / 8 rows of N a tile (one add a 16-byte load, not a multiply per row).
    word_ptrs = qweight_ptr + (k_begin // 8 + tl.arange(0, BLOCK_K // 8))[:, None].to(tl.int64) * N + cols[None, :]
    words, scale, zero = _packed_tile(word_ptrs, scales_ptr, zeros_ptr, k_begin, cols, col_ok, N, GROUP)
    step = (BLOCK_K // 8) * N
    if HALF:  # and the second, whose wait then overlaps x's staging too
        second_words, second_scale, second_zero = _packed_tile(word_ptrs + step, scales_ptr, zeros_ptr,
                                                               k_begin + BLOCK_K, cols, col_ok & (k_begin < k_last),
                                                               N, GROUP)
    pdl.wait(USE_PDL)
    acc0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HALF:
        WORDS: tl.constexpr = BLOCK_K // 8
        # A region of ROWS x K_PER_SPLIT float16 per program (no other program reads it).
        stage = stage_ptr + (pid_k * tl.num_programs(0) + pid_n).to(tl.int64) * ROWS * K_PER_SPLIT
        unscale0 = _stage_half_x(x_ptr, stage, stride_x, 0, k_begin, k_end - k_begin, BLOCK_K, X_CHUNK)
        unscale1 = unscale0
        unscale2 = unscale0
        unscale3 = unscale0
        if ROWS > 1:
            unscale1 = _stage_half_x(x_ptr, stage + K_PER_SPLIT, stride_x, 1, k_begin, k_end - k_begin, BLOCK_K,
                                     X_CHUNK)
        if ROWS > 2:
            unscale2 = _stage_half_x(x_ptr, stage + 2 * K_PER_SPLIT, stride_x, 2, k_begin, k_end - k_begin,
                                     BLOCK_K, X_CHUNK)
        if ROWS > 3:
            unscale3 = _stage_half_x(x_ptr, stage + 3 * K_PER_SPLIT, stride_x, 3, k_begin, k_end - k_begin,
                                     BLOCK_K, X_CHUNK)
        tl.debug_barrier()  # the staged x is read by other threads of the program than wrote it
        # Two tiles an iteration, each loaded while the other is used: loaded straight into the registers it is used
        # from (one tile an iteration would copy its prefetched words over every iteration). A slice with an odd
        # number of tiles ends on a second tile past it: masked, its words are zero and its scale 0, so it adds 0
        # (it must add a finite number: see its staged x below).
        for k in range(k_begin, k_last + BLOCK_K, 2 * BLOCK_K):
            sum0, sum1, sum2, sum3 = _half_tile_sums(words, scale, zero, stage + (k - k_begin), K_PER_SPLIT, ROWS,
                                                     WORDS, USE_ASM)
            acc0 += sum0
            acc1 += sum1
            acc2 += sum2
            acc3 += sum3
            word_ptrs += 2 * step
            words, scale, zero = _packed_tile(word_ptrs, scales_ptr, zeros_ptr, k + 2 * BLOCK_K, cols,
                                              col_ok & (k + BLOCK_K < k_last), N, GROUP)
            # (past the slice, it reads the first tile's staged x again: finite, times the scale 0)
            sum0, sum1, sum2, sum3 = _half_tile_sums(second_words, second_scale, second_zero,
                                                     stage + (tl.minimum(k + BLOCK_K, k_last) - k_begin),
                                                     K_PER_SPLIT, ROWS, WORDS, USE_ASM)
            acc0 += sum0
            acc1 += sum1
            acc2 += sum2
            acc3 += sum3
            second_words, second_scale, second_zero = _packed_tile(word_ptrs + step, scales_ptr, zeros_ptr,
                                                                   k + 3 * BLOCK_K, cols,
                                                                   col_ok & (k + 2 * BLOCK_K < k_last), N, GROUP)
        acc0 *= unscale0
        acc1 *= unscale1
        acc2 *= unscale2
        acc3 *= unscale3
    else:
        for k in range(k_begin, k_last + BLOCK_K, BLOCK_K):
            # The next tile is requested before this one is used, so two are in flight (none past the slice's last).
            word_ptrs += step
            next_words, next_scale, next_zero = _packed_tile(word_ptrs, scales_ptr, zeros_ptr, k + BLOCK_K, cols,
                                                             col_ok & (k < k_last), N, GROUP)
            high = words >> 16  # nibbles 4..7 down to bits 0..15 (the sign bits the shift drags in are masked off)
            x_words = x_ptr + k + tl.arange(0, BLOCK_K // 8) * 8
            tile0 = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
            tile1 = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
            tile2 = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
            tile3 = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(4):
                low_q = _nibble_floats(words, zero, j, USE_ASM)
                high_q = _nibble_floats(high, zero, j, USE_ASM)
                tile0 = _add_row_products(tile0, low_q, high_q, x_words, 0, stride_x, j)
                if ROWS > 1:
                    tile1 = _add_row_products(tile1, low_q, high_q, x_words, 1, stride_x, j)
                if ROWS > 2:
                    tile2 = _add_row_products(tile2, low_q, high_q, x_words, 2, stride_x, j)
                if ROWS > 3:
                    tile3 = _add_row_products(tile3, low_q, high_q, x_words, 3, stride_x, j)
            acc0 += tl.sum(tile0, axis=0) * scale
            acc1 += tl.sum(tile1, axis=0) * scale
            acc2 += tl.sum(tile2, axis=0) * scale
            acc3 += tl.sum(tile3, axis=0) * scale
            words, scale, zero = next_words, next_scale, next_zero
    _finish_row(acc0, 0, y_ptr, partial_ptr, pid_k, cols, col_ok, M, N, SPLIT)
    if ROWS > 1:
        _finish_row(acc1, 1, y_ptr, partial_ptr, pid_k, cols, col_ok, M, N, SPLIT)
    if ROWS > 2:
        _finish_row(acc2, 2, y_ptr, partial_ptr, pid_k, cols, col_ok, M, N, SPLIT)
    if ROWS > 3:
        _finish_row(acc3, 3, y_ptr, partial_ptr, pid_k, cols, col_ok, M, N, SPLIT)
    if SPLIT:
        tl.debug_barrier()  # every thread's partials are written before the count says so (release, below)
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == num_slices - 1:
            # SLICE_CHUNK slices a load: a loop of one load each would wait one L2 round trip per slice, on the
            # launch's critical path. .cg: the other programs' partials come from L2, never from a stale L1 line.
            chunk = tl.arange(0, SLICE_CHUNK)
            for row in tl.static_range(ROWS):
                total = tl.zeros((BLOCK_N,), dtype=tl.float32)
                for first in range(0, num_slices, SLICE_CHUNK):
                    slices = first + chunk
                    total += tl.sum(tl.load(partial_ptr + ((slices * M + row) * N)[:, None] + cols[None, :],
                                            mask=(slices < num_slices)[:, None] & col_ok[None, :], other=0.0,
                                            cache_modifier=".cg"), axis=0)
                tl.store(y_ptr + row * N + cols, total.to(y_ptr.dtype.element_ty), mask=col_ok)
            tl.atomic_xchg(counter_ptr + pid_n, 0, sem="relaxed", scope="gpu")


def gemv_block_k(config: SplitKConfig, group_size: int, rows: int) -> int:
    """The config's BLOCK_K (tuned for one row), down to the group when the group is smaller (a tile never spans two
    groups), and down to MAX_ROWS_X_BLOCK_K / rows for several rows: each row keeps its own tile of products, and
    at 4 rows x 64 the compiled kernel spills registers (sm_90)."""
    rows_limit = MAX_ROWS_X_BLOCK_K // triton.next_power_of_2(rows) if rows > 1 else config.block_k
    return min(config.block_k, group_size, rows_limit)


def _pairs_columns(config: SplitKConfig, block_k: int) -> bool:
    """Does every thread hold an even number of the tile's words? The float16 path's inline PTX takes them two at
    a time; a tile of fewer words than two a thread (BLOCK_N 16 x BLOCK_K 16 on a warp) takes the plain arithmetic."""
    return (block_k // 8) * config.block_n >= 64 * config.num_warps


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


@functools.cache
def _arrival_counters(device: torch.device) -> torch.Tensor:
    """The split-K GEMV's per-column-block counters on a device. Every launch leaves them at zero (the last program
    of a block resets its own), so one buffer serves all launches in stream order; launches that might overlap
    (two streams at once) would need their own. First allocated by an eager call (CUDA graphs are captured after
    a warm-up run), so it is zeroed when a captured launch first reads it."""
    return torch.zeros(MAX_COLUMN_BLOCKS, dtype=torch.int32, device=device)


class KSlices(NamedTuple):
    """How the split-K GEMV cuts K: count slices of tiles_per_slice tiles each (the last may be shorter)."""
    count: int
    tiles_per_slice: int


def split_k_slices(config: SplitKConfig, n: int, k: int, block_k: int, device: torch.device,
                   num_sms: int | None = None) -> KSlices:
    """The config's number of K slices, or with split_k 0 enough for WARPS_PER_SM warps and PROGRAMS_PER_SM programs
    per SM (num_sms, else the device's) in slices of at least MIN_SLICE_K; one when the counters cannot hold the
    column blocks. Whole tiles, and no slice empty: every slice's program must arrive at its column block's
    counter."""
    column_blocks = triton.cdiv(n, config.block_n)
    tiles = k // block_k
    programs = max(WARPS_PER_SM // config.num_warps, PROGRAMS_PER_SM) * (num_sms or _num_sms(device))
    wanted = config.split_k or min(triton.cdiv(programs, column_blocks), max(1, k // MIN_SLICE_K))
    if column_blocks > MAX_COLUMN_BLOCKS:
        wanted = 1
    tiles_per_slice = triton.cdiv(tiles, max(1, min(wanted, tiles)))
    return KSlices(triton.cdiv(tiles, tiles_per_slice), tiles_per_slice)


def new_path_on_gpu() -> bool:
    """The float16 path with the inline PTX (products two to an instruction): on by default since its compiled
    tests passed on an H200 and it decoded 391 tok/s there against the float32 path's 329 (docs/quantization.md);
    SERVAL_W4A16_HALF=0 takes the float32 path in plain Triton (a GPU whose compiler rejects the PTX, comparisons).
    On the CPU (the interpreter) the float16 path is always taken."""
    return os.environ.get("SERVAL_W4A16_HALF", "1") != "0"


def split_k_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, y: torch.Tensor,
                 group_size: int, config: SplitKConfig) -> None:
    """y = x @ W (1 to 4 rows) with config, the group size dividing K and a multiple of config's capped BLOCK_K."""
    m, k = x.shape
    n = qweight.shape[1]
    block_k = gemv_block_k(config, group_size, m)
    slices, tiles_per_slice = split_k_slices(config, n, k, block_k, x.device)
    partials = torch.empty((slices, m, n), dtype=torch.float32, device=x.device) if slices > 1 else y
    counters = _arrival_counters(x.device) if slices > 1 else y
    column_blocks = triton.cdiv(n, config.block_n)
    half = x.dtype in (torch.float16, torch.bfloat16) and (not x.is_cuda or new_path_on_gpu())
    k_per_split = tiles_per_slice * block_k
    # Each program's staged x (float16): a few percent of the weights' bytes, from L1 and L2.
    stage = torch.empty((column_blocks * slices * m * k_per_split if half else 1,), dtype=torch.float16,
                        device=x.device)
    _w4a16_split_k_gemv_kernel[(column_blocks, slices)](
        x, qweight, scales, zeros, y, partials, counters, stage, m, n, k, x.stride(0), k_per_split, slices,
        SPLIT=slices > 1, GROUP=group_size, ROWS=m, BLOCK_N=config.block_n, BLOCK_K=block_k,
        SLICE_CHUNK=PARTIALS_PER_LOAD, HALF=half,
        X_CHUNK=min(X_STAGE_CHUNK, max(X_STAGE_MIN, triton.next_power_of_2(k_per_split))),
        USE_ASM=x.is_cuda and torch.version.hip is None and new_path_on_gpu() and
        (not half or _pairs_columns(config, block_k)),
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl.launch_options(x))
