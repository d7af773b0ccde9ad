"""W4A16: y [M, N] = x [M, K] @ W, W stored as 4-bit integers with a scale and a zero point per group of K rows,
dequantized in registers (Triton): a GEMV for decode rows and a GEMM for prefill.

The one layout every 4-bit format is repacked into at load (serval.layers.quant.w4a16):
    qweight [K/8, N] int32   eight consecutive rows of a column per word, row 8i+j in bits 4j..4j+3 (unsigned)
    scales  [G, N]           x's dtype
    zeros   [G, N] uint8     the unsigned zero point (8 for symmetric formats)
    g_idx   [K] int32        the group of each row of K (k // group_size, or GPTQ's act-order permutation)
    W[k, n] = (q[k, n] - zeros[g_idx[k], n]) * scales[g_idx[k], n]
Reading 4 bits a weight instead of 16 is what a decode step gains: it is nothing but reading the weights.

`reference_linear` dequantizes W in float32 and multiplies: what the CPU runs and what the tests compare with.

Decode rows with groups in order (AWQ, GPTQ without act-order, compressed-tensors) take the split-K GEMV
(serval.kernels.triton_w4a16_gemv); more rows, or GPTQ's act-order, the kernels here.

The grouped kernels' block sizes come from this GPU's table when there is one, `configs/w4a16,device=<GPU>.json`
(`{"device", "grouped_gemv": {"NxK" | "default": [BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages]},
"grouped_gemm": {...: [BLOCK_M, BLOCK_N, BLOCK_K, num_warps]}}`, written by `benchmarks/quant_kernel_tune.py
--write-config`; SPLIT_K 0: chosen from the SM count, triton_w4a16_gemv.split_k_slices), else the built-in GROUPED_*
configs below. A three-number GEMV entry is an older table's, for the kernel before split-K: it is skipped.
"""
from __future__ import annotations

import functools
import json
import os

import torch
import triton
import triton.language as tl

from serval.kernels.triton_w4a16_gemv import SplitKConfig, gemv_block_k, split_k_gemv


# (BLOCK_N, BLOCK_K, num_warps) of the GEMV; (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of the GEMM.
GEMV_CONFIG = (64, 128, 4)
GEMM_CONFIG = (32, 64, 64, 4)
# The same for groups in order (every format but GPTQ's act-order): a tile is part of one group (BLOCK_K divides
# the group), so scales and zeros are read per tile, not per weight. The GEMV's, a SplitKConfig: 128 columns a warp,
# so each thread reads 16 bytes of a row of words and keeps its four columns' sums to itself.
GROUPED_GEMV_CONFIG = SplitKConfig(block_n=256, block_k=64, split_k=0, num_warps=2, num_stages=1)
GROUPED_GEMM_CONFIG = (128, 128, 64, 4)  # the fastest of benchmarks/quant_kernel_tune.py's grid on an H200
# Up to this many rows the GEMVs (the act-order one reads W once per row) beat the GEMM.
GEMV_MAX_ROWS = 4
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
GROUPED_GEMV, GROUPED_GEMM = "grouped_gemv", "grouped_gemm"  # the sections of a device's table


def config_file_name(device_name: str) -> str:
    return f"w4a16,device={device_name.replace(' ', '_')}.json"


def config_table_json(gemv: dict[str, tuple[int, ...]], gemm: dict[str, tuple[int, ...]], device_name: str) -> str:
    """A device's table as tuned_configs reads it (what benchmarks/quant_kernel_tune.py --write-config writes)."""
    return json.dumps({"device": device_name, GROUPED_GEMV: {key: list(c) for key, c in gemv.items()},
                       GROUPED_GEMM: {key: list(c) for key, c in gemm.items()}}, indent=1)


def pick_configs(table: dict | None, n: int, k: int) -> tuple[SplitKConfig | None, tuple[int, ...] | None]:
    """(GEMV config, GEMM config) for an N x K weight from a device's table: the shape's own entry, else the
    table's default, else None (the built-in one). A GEMV entry of another length than SplitKConfig's (an older
    table's, for the kernel before split-K) counts as absent."""
    gemv_section = (table or {}).get(GROUPED_GEMV) or {}
    gemv = [entry for entry in (gemv_section.get(f"{n}x{k}"), gemv_section.get("default"))
            if entry and len(entry) == len(SplitKConfig._fields)]
    gemm_section = (table or {}).get(GROUPED_GEMM) or {}
    gemm = gemm_section.get(f"{n}x{k}") or gemm_section.get("default")
    return (SplitKConfig(*map(int, gemv[0])) if gemv else None), (tuple(int(v) for v in gemm) if gemm else None)


@functools.cache
def _device_table(device_index: int) -> dict | None:
    path = os.path.join(CONFIG_DIR, config_file_name(torch.cuda.get_device_name(device_index)))
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def tuned_configs(x: torch.Tensor, n: int, k: int) -> tuple[SplitKConfig | None, tuple[int, ...] | None]:
    """This GPU's grouped-kernel configs for an N x K weight (None, None on the CPU or without a table)."""
    if not x.is_cuda:
        return None, None
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return pick_configs(_device_table(index), n, k)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               g_idx: torch.Tensor) -> torch.Tensor:
    """The [K, N] float32 weight the packed layout stands for."""
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    q = ((qweight[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(-1, qweight.shape[1])
    groups = g_idx.long()
    return (q - zeros[groups].int()).float() * scales[groups].float()


def reference_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     g_idx: torch.Tensor) -> torch.Tensor:
    return x.float() @ dequantize(qweight, scales, zeros, g_idx)


def groups_in_order(g_idx: torch.Tensor, num_groups: int) -> int | None:
    """The group size when g_idx is k // group_size (no act-order permutation), else None. Called once at load:
    it reads g_idx back from the device."""
    k = g_idx.numel()
    if k % num_groups:
        return None
    group = k // num_groups
    in_order = torch.arange(k, device=g_idx.device, dtype=torch.int32) // group
    return group if torch.equal(g_idx.int(), in_order) else None


def linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
           bias: torch.Tensor | None = None, group_size: int | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype: the kernels on a GPU (or anywhere with SERVAL_W4A16=triton), else the
    reference. group_size: g_idx is k // group_size (groups_in_order), which lets the kernels read one scale row
    per tile."""
    if x.is_cuda or os.environ.get("SERVAL_W4A16") == "triton":
        y = matmul(x, qweight, scales, zeros, g_idx, group_size=group_size)
    else:
        y = reference_linear(x, qweight, scales, zeros, g_idx).to(x.dtype)
    if bias is not None:
        y += bias
    return y


@triton.jit
def _dequantized_tile(qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, ks, cols, K, N):
    """W[ks, cols] as float32 [BLOCK_K, BLOCK_N], read from the packed layout (zero past K or N)."""
    k_ok = ks < K
    mask = k_ok[:, None] & (cols < N)[None, :]
    words = tl.load(qweight_ptr + (ks // 8)[:, None].to(tl.int64) * N + cols[None, :], mask=mask, other=0)
    q = (words >> ((ks % 8) * 4)[:, None]) & 0xF
    groups = tl.load(g_idx_ptr + ks, mask=k_ok, other=0).to(tl.int64)
    scale = tl.load(scales_ptr + groups[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(zeros_ptr + groups[:, None] * N + cols[None, :], mask=mask, other=0).to(tl.int32)
    return (q - zero).to(tl.float32) * scale


@triton.jit
def _w4a16_gemv_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, y_ptr, N, K, stride_x,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offsets = tl.arange(0, BLOCK_K)
    partial = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        ks = k + offsets
        x = tl.load(x_ptr + row * stride_x + ks, mask=ks < K, other=0.0).to(tl.float32)
        partial += x[:, None] * _dequantized_tile(qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, ks, cols, K, N)
    y = tl.sum(partial, axis=0)
    tl.store(y_ptr + row * N + cols, y.to(y_ptr.dtype.element_ty), mask=cols < N)


@triton.jit
def _w4a16_gemm_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, y_ptr, M, N, K, stride_x,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offsets = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        ks = k + offsets
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + ks[None, :],
                    mask=(rows < M)[:, None] & (ks < K)[None, :], other=0.0)
        w = _dequantized_tile(qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, ks, cols, K, N)
        acc += tl.dot(x, w.to(x.dtype))
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & (cols < N)[None, :])


@triton.jit
def _unpacked_tile(qweight_ptr, k, cols, col_ok, N, BLOCK_K: tl.constexpr):
    """The 4-bit values W[k:k+BLOCK_K, cols] as int32 [BLOCK_K, BLOCK_N]: each word read once and split in eight."""
    words = tl.load(qweight_ptr + (k // 8 + tl.arange(0, BLOCK_K // 8))[:, None].to(tl.int64) * N + cols[None, :],
                    mask=col_ok[None, :], other=0, eviction_policy="evict_first")
    shifts = tl.arange(0, 8) * 4
    q = (words[:, None, :] >> shifts[None, :, None]) & 0xF  # [BLOCK_K/8, 8, BLOCK_N]: row 8i+j at [i, j]
    return tl.reshape(q, (BLOCK_K, cols.shape[0]))


@triton.jit
def _w4a16_grouped_gemm_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, y_ptr, M, N, K, stride_x,
                               GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    offsets = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + (k + offsets)[None, :],
                    mask=(rows < M)[:, None], other=0.0)
        group = k // GROUP
        scale = tl.load(scales_ptr + group * N + cols, mask=col_ok, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + group * N + cols, mask=col_ok, other=0).to(tl.int32)
        q = _unpacked_tile(qweight_ptr, k, cols, col_ok, N, BLOCK_K)
        w = (q - zero[None, :]).to(tl.float32) * scale[None, :]
        acc += tl.dot(x, w.to(x.dtype))
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & col_ok[None, :])


def matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
           gemv_config: tuple[int, ...] | None = None,
           gemm_config: tuple[int, int, int, int] | None = None, group_size: int | None = None) -> torch.Tensor:
    """x [M, K] @ W -> [M, N] in x's dtype, accumulated in float32: the GEMV up to GEMV_MAX_ROWS rows, else the
    GEMM. group_size: g_idx is k // group_size (see groups_in_order), so the grouped kernels may run; their
    gemv_config is a SplitKConfig (five numbers), the act-order GEMV's (BLOCK_N, BLOCK_K, num_warps)."""
    m, k = x.shape
    n = qweight.shape[1]
    assert qweight.shape[0] * 8 == k and g_idx.shape == (k,) and x.stride(1) == 1, (x.shape, qweight.shape)
    assert qweight.is_contiguous() and scales.is_contiguous() and zeros.is_contiguous(), "row-major layout only"
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if group_size is not None and gemv_config is None and gemm_config is None:
        tuned_gemv, tuned_gemm = tuned_configs(x, n, k)
        if _grouped_fits(m, k, group_size, tuned_gemv, tuned_gemm):  # a table tuned for another group size may not
            gemv_config, gemm_config = tuned_gemv, tuned_gemm
    if group_size is not None and _grouped_fits(m, k, group_size, gemv_config, gemm_config):
        _grouped_matmul(x, qweight, scales, zeros, y, group_size, gemv_config, gemm_config)
        return y
    if m <= GEMV_MAX_ROWS:
        block_n, block_k, num_warps = gemv_config if gemv_config and len(gemv_config) == 3 else GEMV_CONFIG
        _w4a16_gemv_kernel[(m, triton.cdiv(n, block_n))](x, qweight, scales, zeros, g_idx, y, n, k, x.stride(0),
                                                         BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    else:
        block_m, block_n, block_k, num_warps = gemm_config or GEMM_CONFIG
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _w4a16_gemm_kernel[grid](x, qweight, scales, zeros, g_idx, y, m, n, k, x.stride(0),
                                 BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    return y


def _grouped_fits(m: int, k: int, group_size: int, gemv_config, gemm_config) -> bool:
    """The grouped kernels need whole groups in K and tiles that never split a group across two: BLOCK_K divides
    the group (the GEMV's BLOCK_K is capped at the group first), and whole words."""
    if m <= GEMV_MAX_ROWS:
        if gemv_config is not None and len(gemv_config) != len(SplitKConfig._fields):
            return False  # (BLOCK_N, BLOCK_K, num_warps) configures the act-order GEMV
        block_k = gemv_block_k(SplitKConfig(*(gemv_config or GROUPED_GEMV_CONFIG)), group_size, m)
    else:
        block_k = (gemm_config or GROUPED_GEMM_CONFIG)[2]
    return k % group_size == 0 and group_size % block_k == 0 and block_k % 8 == 0


def _grouped_matmul(x, qweight, scales, zeros, y, group_size, gemv_config, gemm_config) -> None:
    m, k = x.shape
    n = qweight.shape[1]
    if m <= GEMV_MAX_ROWS:
        config = SplitKConfig(*(gemv_config or GROUPED_GEMV_CONFIG))
        split_k_gemv(x, qweight, scales, zeros, y, group_size, config)
    else:
        block_m, block_n, block_k, num_warps = gemm_config or GROUPED_GEMM_CONFIG
        _w4a16_grouped_gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
            x, qweight, scales, zeros, y, m, n, k, x.stride(0), GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=block_k, num_warps=num_warps)
