"""Matrix-vector products for decode at batch 1: y [1, N] = x [1, K] @ W [N, K]^T (+ bias), in Triton.

Why: a batch-1 decode step is nothing but reading every weight once, so its speed is the speed at which the
projections stream W from memory. cuBLAS reads the large gate/up projection of an 8B model near the copy
bandwidth, but the smaller q/k/v and o projections at 40 to 80% of it, and adds a split-K reduction kernel to
some of them (docs/performance.md, issue 7's profile). Here each program owns BLOCK_N whole rows of W and
walks K in BLOCK_K steps, keeping a [BLOCK_N, BLOCK_K] float32 partial sum so that the only reduction across
threads is one per program, at the end. With rows this short the grid has hundreds to thousands of programs even
for the smallest projection, enough to keep every SM's loads in flight, and no second kernel is needed.

W may also be float8 e4m3 with one float32 scale per row (quantization="fp8", serval.layers.fp8): the tile is
converted to float32 on load and the row's sum multiplied by its scale at the end, so an fp8 step reads half the
bytes. With 16-bit x, serval.kernels.triton_fp8_gemv does the same with float16 products, two to an instruction
(fewer instructions a weight; the default, SERVAL_FP8_GEMV_HALF=0 takes the float32 path on CUDA; the interpreter
always takes it). The
torch reference is x @ W.T (serval.layers.linear; for fp8, x @ (W * scale).T); the tests compare against it in the
interpreter on CPU.

The block configuration is chosen per GPU: benchmarks/gemv_bench.py --write-config times its grid on the GPU it
runs on and writes configs/gemv,device=<GPU name>.json, one table for half-precision and one for float8 weights,
each keyed by the projection's "NxK" with a "default" (the configuration fastest over a whole decode step). A shape
the table lacks takes the device's default; a GPU without a table takes DEFAULT_CONFIG / FP8_CONFIG.

Small batches (gemv_rows): y [M, N] = x [M, K] @ W^T for M = 2..8 rows, a speculative verify step (k drafts + 1)
or a few concurrent decode streams. cuBLAS reads W for so few rows below the one-row GEMV's bandwidth although the
bytes are the same, so each program again owns BLOCK_N rows of W, loads each W tile once and multiplies it with all
M rows of x: with CUDA-core FMAs (broadcast products, as the one-row kernel does) or, USE_DOT, with the tensor
cores (tl.dot of the W tile and x's rows padded to 16). Which one and which blocks is the per-GPU table's "rows"
section, keyed by the number of rows benchmarks/gemv_bench.py --rows tuned. Opt-in until measured on an H200
(serval.layers.linear.takes_small_batch_gemv, SERVAL_GEMV_ROWS).
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from serval.kernels import pdl

# Rows per program, K per step, warps: the fastest of benchmarks/gemv_bench.py's grid on an H100 for every
# projection of the Llama-3-8B shape (docs/results/gemv_bench_h100.json); 2.6 to 3.2 TB/s against cuBLAS's
# 2.2 to 2.8.
DEFAULT_CONFIG = (2, 2048, 8)
# The same for float8 weights (one byte each: twice the K per step for the same bytes per tile).
FP8_CONFIG = (2, 4096, 8)
# Block-scaled float8 (serval.layers.quant.fp8's block FP8): benchmarks/quant_kernel_tune.py's fastest on an H200
# (1.6 to 3.3 TB/s over the Llama-3-8B projections; FP8_CONFIG reads the 4096-wide o projection at 0.5).
BLOCK_SCALED_CONFIG = (4, 2048, 4)
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
# The tables' two sections: weights in the activations' half precision, and float8 weights with row scales.
HALF, FLOAT8 = "half", "float8"
# The tables' section for gemv_rows: {"half" | "float8": {"<rows>": {"NxK" | "default": RowsConfig.as_list()}}}.
ROWS = "rows"
# The tables' section for the GEMVs of a batch-1 block with pending norms (gemv with normed, gemv_add_norm), whose
# epilogue or sums change which blocks are fastest: {"half" | "float8": {"NxK": [BLOCK_N, BLOCK_K, num_warps]}}
# (benchmarks/gemv_bench.py --fusions --write-config); a shape it lacks takes the plain GEMV's entry.
PENDING_NORM = "pending_norm"


@dataclass(frozen=True)
class RowsConfig:
    """gemv_rows' blocks: BLOCK_N rows of W per program, BLOCK_K columns per step, and use_dot: the product on the
    tensor cores (x's rows padded to 16) instead of CUDA-core FMAs. num_stages: Triton's software pipelining of
    the K loop (the dot variant's W tiles go through shared memory)."""
    block_n: int
    block_k: int
    num_warps: int
    use_dot: bool
    num_stages: int = 1

    def as_list(self) -> list[int]:
        return [self.block_n, self.block_k, self.num_warps, int(self.use_dot), self.num_stages]

    @classmethod
    def from_list(cls, values: list[int]) -> "RowsConfig":
        block_n, block_k, num_warps, use_dot, num_stages = (int(v) for v in values)
        return cls(block_n, block_k, num_warps, bool(use_dot), num_stages)


# First guesses, not measured on a GPU yet (benchmarks/gemv_bench.py --rows writes the measured ones): the FMA
# variant's [BLOCK_N, rows, BLOCK_K] float32 partial sum at 8 rows is 64 registers a thread, whatever W's dtype.
ROWS_CONFIG = RowsConfig(block_n=2, block_k=512, num_warps=4, use_dot=False)
FP8_ROWS_CONFIG = ROWS_CONFIG


def config_file_name(device_name: str) -> str:
    return f"gemv,device={device_name.replace(' ', '_')}.json"


def shape_key(n: int, k: int) -> str:
    return f"{n}x{k}"


@functools.cache
def load_table(path: str) -> dict | None:
    """A per-GPU JSON table of block configurations (this module's or another kernel's), or None when absent."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)



@functools.cache
def _device_table(device_index: int) -> dict | None:
    return load_table(os.path.join(CONFIG_DIR, config_file_name(torch.cuda.get_device_name(device_index))))


def pick_config(table: dict | None, n: int, k: int, float8: bool,
                pending_norm: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for an N x K weight from a device's table: the shape's own entry (pending_norm:
    first in the PENDING_NORM section), else the table's default, else the built-in one."""
    if pending_norm:
        fused = (((table or {}).get(PENDING_NORM) or {}).get(FLOAT8 if float8 else HALF) or {}).get(shape_key(n, k))
        if fused is not None:
            return tuple(int(v) for v in fused)
    section = (table or {}).get(FLOAT8 if float8 else HALF) or {}
    config = section.get(shape_key(n, k)) or section.get("default")
    if config is None:
        return FP8_CONFIG if float8 else DEFAULT_CONFIG
    return tuple(int(v) for v in config)


def get_config(n: int, k: int, float8: bool, device: torch.device,
               pending_norm: bool = False) -> tuple[int, int, int]:
    """The configuration for this GPU (its table under CONFIG_DIR, if benchmarks/gemv_bench.py wrote one)."""
    table = _device_table(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else None
    return pick_config(table, n, k, float8, pending_norm)


def pick_rows_config(table: dict | None, m: int, n: int, k: int, float8: bool) -> RowsConfig:
    """gemv_rows' blocks for m rows of an N x K weight from a device's table: the entries of the fewest tuned rows
    >= m (else the most tuned), the shape's own entry or that row count's default; else the built-in one."""
    by_rows = ((table or {}).get(ROWS) or {}).get(FLOAT8 if float8 else HALF) or {}
    if by_rows:
        tuned = sorted(int(rows) for rows in by_rows)
        nearest = next((rows for rows in tuned if rows >= m), tuned[-1])
        section = by_rows[str(nearest)]
        config = section.get(shape_key(n, k)) or section.get("default")
        if config is not None:
            return RowsConfig.from_list(config)
    return FP8_ROWS_CONFIG if float8 else ROWS_CONFIG


def get_rows_config(m: int, n: int, k: int, float8: bool, device: torch.device) -> RowsConfig:
    """gemv_rows' configuration for this GPU (its table's "rows" section, if benchmarks/gemv_bench.py wrote one)."""
    table = _device_table(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else None
    return pick_rows_config(table, m, n, k, float8)


RowsTable = dict[int, dict[str, RowsConfig]]  # rows -> "NxK" | "default" -> configuration


def config_table_json(half: dict[str, tuple[int, int, int]], float8: dict[str, tuple[int, int, int]],
                      device_name: str, rows_half: RowsTable | None = None,
                      rows_float8: RowsTable | None = None) -> str:
    """A table as get_config reads it: {"device", "half": {"NxK" | "default": [BLOCK_N, BLOCK_K, num_warps]},
    "float8": {...}} (what benchmarks/gemv_bench.py --write-config writes), and with rows_half / rows_float8 the
    "rows" section get_rows_config reads."""
    table = {"device": device_name, HALF: {key: list(c) for key, c in half.items()},
             FLOAT8: {key: list(c) for key, c in float8.items()}}
    if rows_half or rows_float8:
        table[ROWS] = {name: {str(m): {key: c.as_list() for key, c in entries.items()}
                              for m, entries in sorted((rows or {}).items())}
                       for name, rows in ((HALF, rows_half), (FLOAT8, rows_float8))}
    return json.dumps(table, indent=1)


@triton.jit
def _load(ptr, offsets, K, EVEN_K: tl.constexpr):
    """Elements offsets of the vector at ptr, past K read as 0 (no mask at all when K is a multiple of BLOCK_K)."""
    if EVEN_K:
        return tl.load(ptr + offsets)
    return tl.load(ptr + offsets, mask=offsets < K, other=0.0)


@triton.jit
def _load_w(w_rows, offsets, K, EVEN_K: tl.constexpr):
    """A [BLOCK_N, BLOCK_K] tile of W; read once, so not worth keeping in L2."""
    if EVEN_K:
        return tl.load(w_rows + offsets[None, :], eviction_policy="evict_first")
    return tl.load(w_rows + offsets[None, :], mask=(offsets < K)[None, :], other=0.0, eviction_policy="evict_first")


@triton.jit
def _load_x(x_ptr, offsets, K, GATED: tl.constexpr, EVEN_K: tl.constexpr):
    """A BLOCK_K slice of x in float32."""
    if GATED:  # x = silu(gate) * up of the merged gate/up output [gate | up], rounded as silu_and_mul rounds it
        gate = _load(x_ptr, offsets, K, EVEN_K)
        up = _load(x_ptr + K, offsets, K, EVEN_K).to(tl.float32)
        gate32 = gate.to(tl.float32)
        return (gate32 * tl.sigmoid(gate32) * up).to(gate.dtype).to(tl.float32)
    return _load(x_ptr, offsets, K, EVEN_K).to(tl.float32)


@triton.jit
def _row_block(w_ptr, N, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The program's BLOCK_N output rows (rows, row_valid), the rows it reads (safe_rows), a tile's K offsets (cols)
    and W's row pointers. A row past N reads row N-1 again rather than masking: every load stays unmasked along K
    when K is even."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_valid = rows < N
    safe_rows = tl.where(row_valid, rows, N - 1).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    return rows, row_valid, safe_rows, cols, w_ptr + safe_rows[:, None] * stride_w


@triton.jit
def _store_rows(y, y_ptr, bias_ptr, rows, row_valid, HAS_BIAS: tl.constexpr, residual_ptr, norm_ptr, scaled_ptr,
                sums_ptr, RESIDUAL: tl.constexpr, NEXT_NORM: tl.constexpr):
    """y (float32, [BLOCK_N]) plus the bias, stored in y's dtype for the valid rows. RESIDUAL: the rounded y plus
    the residual stream's rows, rounded again (the block's output added as the next norm's unfused add does).
    NEXT_NORM: that sum h is the next RMSNorm's input, and its rows' share of the norm goes out with it: g h rounded
    to scaled_ptr, and sum(h^2) over the rows to sums_ptr[program] (the norm's sum_of_squares, finished by the
    GEMV that reads scaled_ptr)."""
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_valid, other=0.0).to(tl.float32)
    if RESIDUAL:
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32) + tl.load(residual_ptr + rows, mask=row_valid,
                                                                   other=0.0).to(tl.float32)
    out = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows, out, mask=row_valid)
    if NEXT_NORM:
        h = tl.where(row_valid, out.to(tl.float32), 0.0)
        weight = tl.load(norm_ptr + rows, mask=row_valid, other=0.0).to(tl.float32)
        tl.store(scaled_ptr + rows, (weight * h).to(scaled_ptr.dtype.element_ty), mask=row_valid)
        tl.store(sums_ptr + tl.program_id(0), tl.sum(h * h, axis=0))


@triton.jit
def _load_sums(sums_ptr, num_sums, NORMED: tl.constexpr, SUMS_BLOCK: tl.constexpr):
    """NORMED: the sums of squares the GEMV before wrote (_store_rows' NEXT_NORM), loaded early: they are needed
    only once the products are summed (inverse_rms)."""
    if NORMED:
        return tl.load(sums_ptr + tl.arange(0, SUMS_BLOCK), mask=tl.arange(0, SUMS_BLOCK) < num_sums, other=0.0)
    return tl.zeros((SUMS_BLOCK,), dtype=tl.float32)


@triton.jit
def inverse_rms(sums, K, eps):
    """1 / sqrt(mean(h^2) + eps) of a K-long stream from its per-program sums of squares."""
    return 1.0 / tl.sqrt(tl.sum(sums, axis=0) / K + eps)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, N, K, stride_w, residual_ptr, norm_ptr, scaled_ptr,
                 sums_out_ptr, sums_ptr, num_sums, eps, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                 GATED: tl.constexpr, RESIDUAL: tl.constexpr, NEXT_NORM: tl.constexpr, NORMED: tl.constexpr,
                 SUMS_BLOCK: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 USE_PDL: tl.constexpr):
    rows, row_valid, safe_rows, cols, w_rows = _row_block(w_ptr, N, stride_w, BLOCK_N, BLOCK_K)
    # The first tile of W is no earlier kernel's output: it is read while the previous kernel may still run
    # (programmatic dependent launch), and only x waits for it.
    w = _load_w(w_rows, cols, K, EVEN_K)
    pdl.wait(USE_PDL)
    sums = _load_sums(sums_ptr, num_sums, NORMED, SUMS_BLOCK)
    partial = w.to(tl.float32) * _load_x(x_ptr, cols, K, GATED, EVEN_K)[None, :]
    for k in range(BLOCK_K, K, BLOCK_K):
        partial += _load_w(w_rows, k + cols, K, EVEN_K).to(tl.float32) * _load_x(x_ptr, k + cols, K, GATED,
                                                                                  EVEN_K)[None, :]
    y = tl.sum(partial, axis=1)
    if NORMED:
        y *= inverse_rms(sums, K, eps)
    if HAS_SCALE:
        y *= tl.load(scale_ptr + safe_rows)
    _store_rows(y, y_ptr, bias_ptr, rows, row_valid, HAS_BIAS, residual_ptr, norm_ptr, scaled_ptr, sums_out_ptr,
                RESIDUAL, NEXT_NORM)


@triton.jit
def _block_scaled_gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, N, K, stride_w, stride_s,
                              HAS_BIAS: tl.constexpr, GATED: tl.constexpr, SCALE_GROUP: tl.constexpr,
                              EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              USE_PDL: tl.constexpr):
    # Block-scaled float8 W (one scale per row and SCALE_GROUP columns): each group's partial sum is multiplied by
    # its scale before it joins the others, so x stays unquantized and W is read once, as float8.
    GROUPS_PER_TILE: tl.constexpr = BLOCK_K // SCALE_GROUP
    rows, row_valid, safe_rows, cols, w_rows = _row_block(w_ptr, N, stride_w, BLOCK_N, BLOCK_K)
    tile_groups = tl.arange(0, GROUPS_PER_TILE)
    scale_rows = scale_ptr + safe_rows[:, None] * stride_s
    num_groups = K // SCALE_GROUP
    pdl.wait(USE_PDL)
    partial = tl.zeros((BLOCK_N, GROUPS_PER_TILE), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        products = _load_w(w_rows, k + cols, K, EVEN_K).to(tl.float32) * _load_x(x_ptr, k + cols, K, GATED,
                                                                                  EVEN_K)[None, :]
        per_group = tl.sum(tl.reshape(products, (BLOCK_N, GROUPS_PER_TILE, SCALE_GROUP)), axis=2)
        groups = k // SCALE_GROUP + tile_groups
        partial += per_group * tl.load(scale_rows + groups[None, :], mask=(groups < num_groups)[None, :], other=0.0)
    _store_rows(tl.sum(partial, axis=1), y_ptr, bias_ptr, rows, row_valid, HAS_BIAS, y_ptr, y_ptr, y_ptr, y_ptr,
                False, False)


def block_scaled_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, scale_group: int,
                      bias: torch.Tensor | None = None, config: tuple[int, int, int] | None = None,
                      gated: bool = False) -> torch.Tensor:
    """x [1, K] @ (weight [N, K] float8 * weight_scale [N, K/scale_group] repeated per group)^T + bias -> [1, N] in
    x's dtype: block FP8's batch-1 product (serval.layers.quant.fp8), x not quantized. gated as in gemv."""
    n, k = weight.shape
    assert x.numel() == (2 * k if gated else k) and weight.stride(1) == 1 and k % scale_group == 0, \
        (x.shape, weight.shape, scale_group)
    assert weight_scale.shape == (n, k // scale_group) and weight_scale.stride(1) == 1, weight_scale.shape
    x = x.reshape(-1).contiguous()
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    block_n, block_k, num_warps = config or BLOCK_SCALED_CONFIG
    block_k = max(scale_group, min(block_k, triton.next_power_of_2(k)))
    assert block_k % scale_group == 0, (block_k, scale_group)
    _block_scaled_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, weight_scale, bias if bias is not None else weight, y, n, k, weight.stride(0),
        weight_scale.stride(0), HAS_BIAS=bias is not None, GATED=gated, SCALE_GROUP=scale_group,
        EVEN_K=k % block_k == 0, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, **pdl.launch_options(x))
    return y


@dataclass(frozen=True)
class PendingNorm:
    """RMSNorm(h) of one row [1, K], left for the GEMV that reads it (gemv's normed) to finish: scaled = weight * h
    rounded to h's dtype, square_sums [P] float32 the sums of h^2 over each program's rows of the GEMV that wrote
    h (gemv_add_norm), and the norm's eps. RMSNorm(h) = scaled / sqrt(sum(square_sums) / K + eps)."""
    scaled: torch.Tensor
    square_sums: torch.Tensor
    eps: float


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: tuple[int, int, int] | None = None, gated: bool = False,
         weight_scale: torch.Tensor | None = None, half_products: bool | None = None,
         residual: torch.Tensor | None = None, normed: PendingNorm | None = None) -> torch.Tensor:
    """x [1, K] (any leading shape with one row) @ weight [N, K]^T + bias [N] -> [1, N], in x's dtype.
    gated: x is [1, 2K], a merged gate/up output, and the product is with silu(gate) * up (SwiGLU fused into the
    down projection: one kernel, and the [1, K] activation never goes to memory). Accumulates in float32, as
    cuBLAS does. config: (BLOCK_N, BLOCK_K, num_warps); None: this GPU's tuned one (get_config). weight_scale [N]
    float32: weight is float8 and row n of the product is multiplied by weight_scale[n]. half_products (float8
    weight, 16-bit x): the products in float16 (serval.kernels.triton_fp8_gemv); None: on the CPU yes, on CUDA as
    SERVAL_FP8_GEMV_HALF says.
    residual [1, N]: the result plus it (a block's output added to the residual stream, rounded as the unfused add
    rounds it). normed: the product is with that RMSNorm (x is None): its scaled row times 1/rms, so the norm
    needs no kernel of its own (the GEMV before wrote its parts, gemv_add_norm)."""
    return _launch(x, weight, bias, config, gated, weight_scale, half_products, residual, normed)[0]


def gemv_add_norm(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                  eps: float, bias: torch.Tensor | None = None, config: tuple[int, int, int] | None = None,
                  gated: bool = False, weight_scale: torch.Tensor | None = None,
                  half_products: bool | None = None) -> tuple[torch.Tensor, PendingNorm]:
    """gemv(...) + residual = h, the residual stream after a block, and the next RMSNorm (norm_weight, eps) of h
    left pending for the GEMV that reads it: (h [1, N], PendingNorm)."""
    return _launch(x, weight, bias, config, gated, weight_scale, half_products, residual, None, (norm_weight, eps))


def _launch(x, weight, bias, config, gated, weight_scale, half_products, residual, normed, next_norm=None):
    """gemv and gemv_add_norm's one launch: (y, the next norm pending or None)."""
    n, k = weight.shape
    if normed is not None:
        assert x is None and not gated and normed.scaled.numel() == k, (normed.scaled.shape, k)
        x = normed.scaled
    assert x.numel() == (2 * k if gated else k) and weight.stride(1) == 1, (x.shape, weight.shape, weight.stride())
    assert residual is None or residual.numel() == n, (residual.shape, n)
    x = x.reshape(-1).contiguous()
    residual = residual.reshape(-1).contiguous() if residual is not None else None
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    block_n, block_k, num_warps = config or get_config(n, k, weight_scale is not None, x.device,
                                                       pending_norm=normed is not None or next_norm is not None)
    block_k = min(block_k, triton.next_power_of_2(k))
    pending = None
    if next_norm is not None:
        norm_weight, eps = next_norm
        assert residual is not None and norm_weight.shape == (n,), (norm_weight.shape, n)
        pending = PendingNorm(torch.empty_like(y), torch.empty(triton.cdiv(n, block_n), dtype=torch.float32,
                                                               device=x.device), eps)
    epilogue = dict(residual=residual, norm_weight=next_norm[0] if next_norm else None, pending=pending)
    if weight_scale is not None and x.dtype in (torch.float16, torch.bfloat16):
        from serval.kernels import triton_fp8_gemv  # it imports this module's loads
        if half_products is None:
            half_products = not x.is_cuda or triton_fp8_gemv.half_products_on_gpu()
        if half_products:
            triton_fp8_gemv.launch(x, weight, weight_scale, bias, y, (block_n, block_k, num_warps), gated,
                                   normed=normed, **epilogue)
            return y, pending
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, weight_scale if weight_scale is not None else weight, bias if bias is not None else weight, y, n,
        k, weight.stride(0), *fusion_arguments(y, normed, **epilogue), HAS_SCALE=weight_scale is not None,
        HAS_BIAS=bias is not None, GATED=gated, EVEN_K=k % block_k == 0, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, **fusion_constants(normed, **epilogue), **pdl.launch_options(x))
    return y, pending


def fusion_arguments(y: torch.Tensor, normed: PendingNorm | None, residual: torch.Tensor | None,
                     norm_weight: torch.Tensor | None, pending: PendingNorm | None) -> tuple:
    """The GEMV kernels' residual_ptr, norm_ptr, scaled_ptr, sums_out_ptr, sums_ptr, num_sums, eps (y for a
    pointer not used)."""
    return (residual if residual is not None else y, norm_weight if norm_weight is not None else y,
            pending.scaled if pending else y, pending.square_sums if pending else y,
            normed.square_sums if normed else y, normed.square_sums.numel() if normed else 1,
            normed.eps if normed else 0.0)


def fusion_constants(normed: PendingNorm | None, residual: torch.Tensor | None, norm_weight: torch.Tensor | None,
                     pending: PendingNorm | None) -> dict:
    return dict(RESIDUAL=residual is not None, NEXT_NORM=pending is not None, NORMED=normed is not None,
                SUMS_BLOCK=triton.next_power_of_2(normed.square_sums.numel()) if normed else 1)


@triton.jit
def _load_x_rows(x_rows, offsets, K, GATED: tl.constexpr, EVEN_K: tl.constexpr):
    """A [BLOCK_M, BLOCK_K] tile of x's rows in x's dtype (gated: silu(gate) * up, rounded as silu_and_mul does)."""
    if EVEN_K:
        gate = tl.load(x_rows + offsets[None, :])
    else:
        gate = tl.load(x_rows + offsets[None, :], mask=(offsets < K)[None, :], other=0.0)
    if GATED:
        if EVEN_K:
            up = tl.load(x_rows + K + offsets[None, :])
        else:
            up = tl.load(x_rows + K + offsets[None, :], mask=(offsets < K)[None, :], other=0.0)
        gate32 = gate.to(tl.float32)
        return (gate32 * tl.sigmoid(gate32) * up.to(tl.float32)).to(gate.dtype)
    return gate


@triton.jit
def _rows_fma(w_rows, x_rows, K, GATED: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr,
              USE_PDL: tl.constexpr):
    """[BLOCK_N, BLOCK_M] products on the CUDA cores: a [BLOCK_N, BLOCK_M, BLOCK_K] float32 partial sum, reduced
    across threads once at the end, as _gemv_kernel does for one row."""
    cols = tl.arange(0, BLOCK_K)
    w = _load_w(w_rows, cols, K, EVEN_K)  # before the wait: W is no earlier kernel's output
    pdl.wait(USE_PDL)
    x = _load_x_rows(x_rows, cols, K, GATED, EVEN_K)
    partial = w.to(tl.float32)[:, None, :] * x.to(tl.float32)[None, :, :]
    for k in range(BLOCK_K, K, BLOCK_K):
        w = _load_w(w_rows, k + cols, K, EVEN_K)
        x = _load_x_rows(x_rows, k + cols, K, GATED, EVEN_K)
        partial += w.to(tl.float32)[:, None, :] * x.to(tl.float32)[None, :, :]
    return tl.sum(partial, axis=2)


@triton.jit
def _rows_dot(w_rows, x_rows, K, GATED: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    """[BLOCK_N, BLOCK_M] products on the tensor cores, W as the MMA's tall operand and the few rows of x as its
    narrow one ("swap AB"): BLOCK_N can be 64 or more while x pads only to 16. float8 W is converted to x's dtype."""
    cols = tl.arange(0, BLOCK_K)
    w = _load_w(w_rows, cols, K, EVEN_K)
    pdl.wait(USE_PDL)
    x = _load_x_rows(x_rows, cols, K, GATED, EVEN_K)
    acc = tl.dot(w.to(x.dtype), tl.trans(x), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32))
    for k in range(BLOCK_K, K, BLOCK_K):
        x = _load_x_rows(x_rows, k + cols, K, GATED, EVEN_K)
        acc = tl.dot(_load_w(w_rows, k + cols, K, EVEN_K).to(x.dtype), tl.trans(x), acc)
    return acc


@triton.jit
def _gemv_rows_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, M, N, K, stride_x, stride_y, stride_w,
                      HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr, EVEN_K: tl.constexpr,
                      USE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      USE_PDL: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_valid = rows < N
    # Rows of W past N and rows of x past M read the last real one again instead of masking (see _gemv_kernel);
    # their products are never stored.
    safe_rows = tl.where(row_valid, rows, N - 1).to(tl.int64)
    tokens = tl.arange(0, BLOCK_M)
    safe_tokens = tl.minimum(tokens, M - 1).to(tl.int64)
    w_rows = w_ptr + safe_rows[:, None] * stride_w
    x_rows = x_ptr + safe_tokens[:, None] * stride_x
    if USE_DOT:
        acc = _rows_dot(w_rows, x_rows, K, GATED, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, USE_PDL)
    else:
        acc = _rows_fma(w_rows, x_rows, K, GATED, EVEN_K, BLOCK_K, USE_PDL)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + safe_rows)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_valid, other=0.0).to(tl.float32)[:, None]
    out = y_ptr + tokens[None, :].to(tl.int64) * stride_y + rows[:, None]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=row_valid[:, None] & (tokens < M)[None, :])


def gemv_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              config: RowsConfig | None = None, gated: bool = False,
              weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] with a few rows (2 to 8: serval.layers.linear.takes_small_batch_gemv) @ weight [N, K]^T + bias
    -> [M, N] in x's dtype, reading W once for all rows. gated and weight_scale as in gemv. config: blocks and
    variant; None: this GPU's tuned one for this many rows (get_rows_config)."""
    n, k = weight.shape
    row_length = 2 * k if gated else k
    assert x.shape[-1] == row_length and weight.stride(1) == 1, (x.shape, weight.shape, weight.stride())
    x = x.reshape(-1, row_length)
    if x.stride(1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    config = config or get_rows_config(m, n, k, weight_scale is not None, x.device)
    block_m, block_n = triton.next_power_of_2(m), config.block_n
    block_k = min(config.block_k, triton.next_power_of_2(k))
    if config.use_dot:  # tl.dot's smallest tile is 16 on every side
        block_m, block_n, block_k = max(16, block_m), max(16, block_n), max(16, block_k)
    _gemv_rows_kernel[(triton.cdiv(n, block_n),)](
        x, weight, weight_scale if weight_scale is not None else weight, bias if bias is not None else weight, y,
        m, n, k, x.stride(0), y.stride(0), weight.stride(0), HAS_SCALE=weight_scale is not None,
        HAS_BIAS=bias is not None, GATED=gated, EVEN_K=k % block_k == 0, USE_DOT=config.use_dot, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=config.num_warps, num_stages=config.num_stages,
        **pdl.launch_options(x))
    return y
