"""GGUF weights kept in their blocks on the GPU: y [M, N] = x [M, K] @ W^T, W read as the GGUF file stores it and
dequantized in registers (Triton): a GEMV for decode rows and a tl.dot GEMM for more rows.

A batch-1 Q4_K product (the bulk of a Q4_K_M model's decode) has its own kernel that reads the quants as 32-bit
words and applies each sub-block's scale to partial sums (q4_k_gemv). The layout is the file's own: `blocks` uint8 [N, K / QK * BYTES], one row of GGUF blocks per output. Each type is
read as w = q * scale + offset per scale group, q the unsigned (Q8_0: signed) quant:

    type   QK   bytes  per block                                      group  scale        offset       bits/weight
    Q8_0   32   34     d f16, 32 x int8                               32     d            0            8.5
    Q4_0   32   18     d f16, 16 bytes: q j (low) and j+16 (high)     32     d            -8 d         4.5
    Q4_1   32   20     d, m f16, 16 bytes as Q4_0                     32     d            m            5.0
    Q5_0   32   22     d f16, 4 bytes of fifth bits, 16 as Q4_0       32     d            -16 d        5.5
    Q5_1   32   24     d, m f16, 4 bytes of fifth bits, 16 as Q4_0    32     d            m            6.0
    Q4_K   256  144    d, dmin f16, 12 bytes of 6-bit sc/mn x 8,      32     d sc_s       -dmin mn_s   4.5
                       128 bytes: 4 chunks of 32, low then high nibble
    Q5_K   256  176    Q4_K's, then 32 bytes of fifth bits, then qs  32     d sc_s       -dmin mn_s   5.5
    Q6_K   256  210    ql 128, qh 64, 16 x int8 scales, d f16         16     d sc_s       -32 d sc_s   6.5625

Reading the blocks as stored keeps the bytes per weight of the file (a Q4_K projection 0.5625 bytes a weight, not
2 in bfloat16), and a decode step is nothing but reading the weights. `reference_linear` dequantizes with the
numpy dequantizers (serval.layers.quant.gguf_blocks, checked against gguf.quants) and multiplies in float32: what
the tests compare with.
"""
from __future__ import annotations

import gguf
import torch
import triton
import triton.language as tl

Q = gguf.GGMLQuantizationType
SUPPORTED_TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)
# (BLOCK_N, BLOCK_K, num_warps) of the GEMV, per block size QK (BLOCK_K a multiple of it).
GEMV_CONFIG = {32: (16, 256, 4), 256: (16, 256, 4)}
# (BLOCK_N, num_warps) of the batch-1 Q4_K GEMV (one 256-weight super-block per step).
Q4_K_GEMV_CONFIG = (16, 4)
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of the GEMM: decode batches (up to 16 rows, W read once for all of them)
# and prefill.
SMALL_GEMM_CONFIG = (16, 32, 256, 4)
GEMM_CONFIG = (64, 64, 256, 4)
# Up to this many rows the GEMV (every row of x against one tile of W) beats tl.dot's 16-row minimum.
GEMV_MAX_ROWS = 4
SMALL_GEMM_MAX_ROWS = 16


def block_size(qtype) -> int:
    return gguf.GGML_QUANT_SIZES[Q(qtype)][0]


def row_bytes(qtype, in_features: int) -> int:
    """Bytes of one output's row of GGUF blocks."""
    size, type_size = gguf.GGML_QUANT_SIZES[Q(qtype)]
    return in_features // size * type_size


def dequantize(blocks: torch.Tensor, qtype, in_features: int) -> torch.Tensor:
    """The [N, K] float32 weight the blocks stand for (on the CPU, through numpy)."""
    from serval.layers.quant.gguf_blocks import dequantize as dequantize_numpy
    return dequantize_numpy(blocks.cpu().numpy(), Q(qtype), (blocks.shape[0], in_features))


def reference_linear(x: torch.Tensor, blocks: torch.Tensor, qtype) -> torch.Tensor:
    weight = dequantize(blocks, qtype, x.shape[-1]).to(x.device)
    return x.float() @ weight.t()


@triton.jit
def _f16_at(ptr, mask):
    """The little-endian float16 at byte ptr, as float32."""
    low = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    high = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (low | (high << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _k_scale_and_min(scales_ptr, s, mask):
    """Q4_K/Q5_K: sub-block s's 6-bit scale and min from the 12 packed bytes at scales_ptr (ggml's get_scale_min_k4)."""
    at_s = tl.load(scales_ptr + s, mask=mask, other=0).to(tl.int32)
    at_s4 = tl.load(scales_ptr + s + 4, mask=mask, other=0).to(tl.int32)
    at_s_minus_4 = tl.load(scales_ptr + s % 4, mask=mask, other=0).to(tl.int32)
    low = s < 4
    scale = tl.where(low, at_s & 63, (at_s4 & 0xF) | ((at_s_minus_4 >> 6) << 4))
    minimum = tl.where(low, at_s4 & 63, (at_s4 >> 4) | ((at_s >> 6) << 4))
    return scale.to(tl.float32), minimum.to(tl.float32)


@triton.jit
def _five_bit_quants(w_ptr, block, j, mask, SCALES_END: tl.constexpr):
    byte = tl.load(w_ptr + block + (SCALES_END + 4 + j % 16)[None, :], mask=mask, other=0).to(tl.int32)
    fifth = tl.load(w_ptr + block + (SCALES_END + j // 8)[None, :], mask=mask, other=0).to(tl.int32)
    return ((byte >> ((j // 16) * 4)[None, :]) & 0xF) | (((fifth >> (j % 8)[None, :]) & 1) << 4)


@triton.jit
def _quants(w_ptr, row_base, k, mask, QTYPE: tl.constexpr, QK: tl.constexpr, BYTES: tl.constexpr):
    """The quants of weights k (a [BLOCK_K] range) of the rows at row_base, as float32 [BLOCK_N, BLOCK_K]."""
    j = k % QK
    block = row_base + (k // QK * BYTES)[None, :]
    if QTYPE == 8:  # Q8_0
        q = tl.load(w_ptr + block + (2 + j)[None, :], mask=mask, other=0).to(tl.int8, bitcast=True)
    elif QTYPE == 2:  # Q4_0: weight j in byte j % 16, low nibble for the first 16
        byte = tl.load(w_ptr + block + (2 + j % 16)[None, :], mask=mask, other=0).to(tl.int32)
        q = (byte >> ((j // 16) * 4)[None, :]) & 0xF
    elif QTYPE == 3:  # Q4_1: as Q4_0 after two fp16
        byte = tl.load(w_ptr + block + (4 + j % 16)[None, :], mask=mask, other=0).to(tl.int32)
        q = (byte >> ((j // 16) * 4)[None, :]) & 0xF
    elif QTYPE == 6:  # Q5_0: 32 fifth bits (weight j: bit j % 8 of byte j // 8), then Q4_0's nibbles
        q = _five_bit_quants(w_ptr, block, j, mask, 2)
    elif QTYPE == 7:  # Q5_1: the same after two fp16
        q = _five_bit_quants(w_ptr, block, j, mask, 4)
    elif QTYPE == 12:  # Q4_K: chunks of 64 weights in 32 bytes, low nibbles then high
        byte = tl.load(w_ptr + block + (16 + j // 64 * 32 + j % 32)[None, :], mask=mask, other=0).to(tl.int32)
        q = (byte >> ((j // 32 % 2) * 4)[None, :]) & 0xF
    elif QTYPE == 13:  # Q5_K: Q4_K's nibbles after 32 bytes holding bit 4 of weight j's sub-block j // 32
        byte = tl.load(w_ptr + block + (48 + j // 64 * 32 + j % 32)[None, :], mask=mask, other=0).to(tl.int32)
        fifth = tl.load(w_ptr + block + (16 + j % 32)[None, :], mask=mask, other=0).to(tl.int32)
        q = ((byte >> ((j // 32 % 2) * 4)[None, :]) & 0xF) | (((fifth >> (j // 32)[None, :]) & 1) << 4)
    else:  # Q6_K: two halves of 128 weights; ql 64 bytes (low nibbles then high), qh 32 bytes (2 bits x 4)
        half = j // 128
        within = j % 128
        low = tl.load(w_ptr + block + (half * 64 + within % 64)[None, :], mask=mask, other=0).to(tl.int32)
        high = tl.load(w_ptr + block + (128 + half * 32 + within % 32)[None, :], mask=mask, other=0).to(tl.int32)
        q = ((low >> ((within // 64) * 4)[None, :]) & 0xF) | (((high >> ((within // 32) * 2)[None, :]) & 3) << 4)
    return q.to(tl.float32)


@triton.jit
def _group_scales(w_ptr, row_base, groups, mask, QTYPE: tl.constexpr, QK: tl.constexpr, BYTES: tl.constexpr,
                  GROUP: tl.constexpr):
    """(scale, offset) float32 [BLOCK_N, G] of scale groups `groups` (a [G] range): w = q * scale + offset."""
    block = row_base + (groups * GROUP // QK * BYTES)[None, :]
    s = groups % (QK // GROUP)
    d = _f16_at(w_ptr + block, mask)
    if QTYPE == 8:
        scale = d
        offset = d * 0.0
    elif QTYPE == 2:
        scale = d
        offset = -8.0 * d
    elif QTYPE == 3 or QTYPE == 7:
        scale = d
        offset = _f16_at(w_ptr + block + 2, mask)
    elif QTYPE == 6:
        scale = d
        offset = -16.0 * d
    elif QTYPE == 12 or QTYPE == 13:
        sc, mn = _k_scale_and_min(w_ptr + block + 4, s[None, :], mask)
        scale = d * sc
        offset = -_f16_at(w_ptr + block + 2, mask) * mn
    else:  # Q6_K: d is at byte 208, the int8 scales at 192
        d = _f16_at(w_ptr + block + 208, mask)
        sc = tl.load(w_ptr + block + 192 + s[None, :], mask=mask, other=0).to(tl.int8, bitcast=True)
        scale = d * sc.to(tl.float32)
        offset = -32.0 * scale
    return scale, offset


@triton.jit
def _weight_tile(w_ptr, cols, k_start, N, K, stride_w, QTYPE: tl.constexpr, QK: tl.constexpr, BYTES: tl.constexpr,
                 GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[cols, k_start:k_start+BLOCK_K] as float32 [BLOCK_N, BLOCK_K] (zero past N or K)."""
    G: tl.constexpr = BLOCK_K // GROUP
    k = k_start + tl.arange(0, BLOCK_K)
    groups = k_start // GROUP + tl.arange(0, G)
    row_base = cols[:, None].to(tl.int64) * stride_w
    col_ok = (cols < N)[:, None]
    q = _quants(w_ptr, row_base, k, col_ok & (k < K)[None, :], QTYPE, QK, BYTES)
    scale, offset = _group_scales(w_ptr, row_base, groups, col_ok & (groups * GROUP < K)[None, :], QTYPE, QK,
                                  BYTES, GROUP)
    w = tl.reshape(q, (BLOCK_N, G, GROUP)) * scale[:, :, None] + offset[:, :, None]
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _gguf_gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_x, stride_w, QTYPE: tl.constexpr, QK: tl.constexpr,
                      BYTES: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    # One program per BLOCK_N outputs and every row of x: each tile of W is read once for all rows.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        w = _weight_tile(w_ptr, cols, k_start, N, K, stride_w, QTYPE, QK, BYTES, GROUP, BLOCK_N, BLOCK_K)
        ks = k_start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=(rows < M)[:, None] & (ks < K)[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & (cols < N)[None, :])


@triton.jit
def _gguf_gemm_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_x, stride_w, QTYPE: tl.constexpr, QK: tl.constexpr,
                      BYTES: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + ks[None, :],
                    mask=(rows < M)[:, None] & (ks < K)[None, :], other=0.0)
        w = _weight_tile(w_ptr, cols, k_start, N, K, stride_w, QTYPE, QK, BYTES, GROUP, BLOCK_N, BLOCK_K)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    tl.store(y_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & (cols < N)[None, :])


@triton.jit
def _q4_k_gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_w, BLOCK_N: tl.constexpr):
    # Batch-1 Q4_K: a super-block's 128 quant bytes read as 32 words (one 16-byte aligned run per row, where the
    # generic tile's per-weight byte gathers issue 8x as many loads), x gathered in the words' nibble order, and
    # each 32-weight sub-block's scale and min applied to its partial sums: sum_j x_j (d sc q_j - dmin mn) =
    # d sc (sum_j x_j q_j) - dmin mn (sum_j x_j).
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    chunk = tl.arange(0, 4)  # 64 weights, 32 bytes: low nibbles are weights 0..31 of it, high ones 32..63
    word = tl.arange(0, 8)  # the chunk's 8 words, 4 bytes each
    high = tl.arange(0, 2)
    byte = tl.arange(0, 4)
    word_at = 16 + (chunk[:, None] * 8 + word[None, :]) * 4  # [4, 8] byte offset in the block
    x_at = (chunk[:, None, None, None] * 64 + high[None, None, :, None] * 32 + word[None, :, None, None] * 4
            + byte[None, None, None, :])  # [4, 8, 2, 4]: the weight each nibble holds
    shifts = high[:, None] * 4 + byte[None, :] * 8  # [2, 4]
    sub_block = chunk[:, None] * 2 + high[None, :]  # [4, 2]
    row_base = cols.to(tl.int64) * stride_w
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for b in range(0, K // 256):
        block = row_base + b * 144
        words = tl.load((w_ptr + block[:, None, None] + word_at[None, :, :]).to(tl.pointer_type(tl.int32)),
                        mask=col_ok[:, None, None], other=0)  # [BLOCK_N, 4, 8]
        q = (words[:, :, :, None, None] >> shifts[None, None, None, :, :]) & 0xF  # [BLOCK_N, 4, 8, 2, 4]
        x = tl.load(x_ptr + b * 256 + x_at).to(tl.float32)
        dots = tl.sum(tl.sum(q.to(tl.float32) * x[None], axis=4), axis=2)  # [BLOCK_N, 4, 2]
        x_sums = tl.sum(tl.sum(x, axis=3), axis=1)  # [4, 2]
        ok = col_ok[:, None, None]
        d = _f16_at(w_ptr + block[:, None, None], ok)
        dmin = _f16_at(w_ptr + block[:, None, None] + 2, ok)
        sc, mn = _k_scale_and_min(w_ptr + block[:, None, None] + 4, sub_block[None, :, :], ok)
        acc += tl.sum(tl.sum(d * sc * dots - dmin * mn * x_sums[None], axis=2), axis=1)
    tl.store(y_ptr + cols, acc.to(y_ptr.dtype.element_ty), mask=col_ok)


def _type_constants(qtype) -> dict:
    qtype = Q(qtype)
    if qtype not in SUPPORTED_TYPES:
        raise ValueError(f"GGUF type {qtype.name} has no GPU kernel; supported: "
                         f"{[t.name for t in SUPPORTED_TYPES]}")
    qk, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return dict(QTYPE=int(qtype), QK=qk, BYTES=type_size, GROUP=16 if qtype == Q.Q6_K else 32)


def matmul(x: torch.Tensor, blocks: torch.Tensor, qtype, gemv_config: tuple[int, int, int] | None = None,
           gemm_config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N] in x's dtype, accumulated in float32; W the GGUF blocks uint8 [N, bytes per row].
    The GEMV up to GEMV_MAX_ROWS rows (one Q4_K row: q4_k_gemv, unless gemv_config asks for the generic one), else
    the GEMM (16-row tiles up to SMALL_GEMM_MAX_ROWS). A config's BLOCK_K must be a multiple of the type's block
    size (32, or 256 for the K-quants)."""
    m, k = x.shape
    n = blocks.shape[0]
    constants = _type_constants(qtype)
    assert k % constants["QK"] == 0 and blocks.shape[1] == row_bytes(qtype, k), (x.shape, blocks.shape)
    assert blocks.dtype == torch.uint8 and blocks.stride(1) == 1 and x.stride(1) == 1
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 1 and Q(qtype) == Q.Q4_K and gemv_config is None:
        return q4_k_gemv(x, blocks)
    if m <= GEMV_MAX_ROWS:
        block_n, block_k, num_warps = gemv_config or GEMV_CONFIG[constants["QK"]]
        _check_block_k(block_k, constants["QK"])
        _gguf_gemv_kernel[(triton.cdiv(n, block_n),)](
            x, blocks, y, m, n, k, x.stride(0), blocks.stride(0), BLOCK_M=triton.next_power_of_2(m),
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, **constants)
        return y
    block_m, block_n, block_k, num_warps = gemm_config or (SMALL_GEMM_CONFIG if m <= SMALL_GEMM_MAX_ROWS
                                                           else GEMM_CONFIG)
    _check_block_k(block_k, constants["QK"])
    _gguf_gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        x, blocks, y, m, n, k, x.stride(0), blocks.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, **constants)
    return y


def q4_k_gemv(x: torch.Tensor, blocks: torch.Tensor, config: tuple[int, int] | None = None) -> torch.Tensor:
    """x [1, K] @ W^T -> [1, N] for Q4_K blocks: the batch-1 kernel that reads the quants as words. config:
    (BLOCK_N, num_warps), Q4_K_GEMV_CONFIG by default."""
    k = x.shape[-1]
    n = blocks.shape[0]
    assert x.shape == (1, k) and k % 256 == 0 and blocks.shape[1] == row_bytes(Q.Q4_K, k), (x.shape, blocks.shape)
    assert blocks.dtype == torch.uint8 and blocks.stride(1) == 1
    x = x.contiguous()
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    block_n, num_warps = config or Q4_K_GEMV_CONFIG
    _q4_k_gemv_kernel[(triton.cdiv(n, block_n),)](x, blocks, y, n, k, blocks.stride(0), BLOCK_N=block_n,
                                                  num_warps=num_warps)
    return y


def _check_block_k(block_k: int, qk: int) -> None:
    if block_k % qk:
        raise ValueError(f"BLOCK_K={block_k} splits GGUF blocks of {qk} weights; use a multiple of {qk}")


def bytes_per_weight(qtype) -> float:
    size, type_size = gguf.GGML_QUANT_SIZES[Q(qtype)]
    return type_size / size

