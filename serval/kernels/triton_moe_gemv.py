"""Mixture-of-experts for small batches (decode): each token's k chosen experts as matrix-vector products that read
the experts' weights at the GPU's bandwidth, in two kernels. Same contract and rounding as the grouped kernel
(serval.kernels.triton_moe) and its torch reference (serval.layers.moe.fused_experts_reference).

    1. gate/up: one program per (slot = token x chosen expert, BLOCK_N columns of the intermediate). It reads its
       expert id from the routing (no sort, no alignment), walks the hidden size in BLOCK_K steps over the
       expert's BLOCK_N gate rows and BLOCK_N up rows, and writes silu(gate) * up (gpt-oss: biases and the clamped
       SwiGLU over interleaved rows) for its slot, [T*k, I] in the model dtype;
    2. down: one program per (token, BLOCK_N output columns) over the token's k experts at once, a
       [k, BLOCK_N, BLOCK_K] tile per step. Each expert's product is rounded to the model dtype, weighted by its
       top-k weight and summed in float32 in registers: no atomics (deterministic) and no combine kernel.

Why: at batch 1 a MoE layer is k expert products of a [1, H] row, pure weight reading, like the dense projections
that triton_gemv reads at ~89% of the H200's bandwidth. The grouped kernel pads each expert's one row to a
BLOCK_M tile for tensor cores that have nothing to reuse, and adds an alignment and a combine launch; here two
launches read exactly the chosen experts' rows, and each program keeps a [rows, BLOCK_K] float32 partial sum so
that the only reduction across threads is one per program (triton_gemv's structure). Programs that share a column
block are adjacent in the grid, so slots routed to the same expert read its tile while it is in L2. Beyond a few
dozen rows the grouped kernel's reuse wins: `max_rows` says where (serval.kernels.triton_moe.fused_experts
dispatches on T * k, a host-known shape, so decode graphs capture either path).

float8 experts (quantization="fp8", a float32 scale per expert and output row): tiles are widened to float32 on
load and each row's sum is multiplied by its scale, half the bytes read.

Block configurations come from a per-device table that benchmarks/moe_tune.py --gemv writes
(configs/moe_gemv,device=<GPU name>.json, named as triton_gemv's table): per kernel and weight format, each
expert shape's [BLOCK_N, BLOCK_K, num_warps] or the table's default; and per expert shape max_rows, the largest
T * k for which this path beat the grouped kernel there.
"""
from __future__ import annotations

import functools
import json
import os

import torch
import triton
import triton.language as tl

from serval.kernels import pdl
from serval.kernels.triton_gemv import FLOAT8, HALF, load_table, shape_key

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
# (BLOCK_N, BLOCK_K, num_warps) without a table: triton_gemv's tile of about 4K elements per step, counting the
# gate and the up tile (gate/up) and the k experts' tiles (down; BLOCK_N is divided by the padded k at launch).
DEFAULT_GATE_UP = (2, 1024, 4)
DEFAULT_DOWN = (16, 256, 4)
# float8 weights: twice the K per step for the same bytes per tile.
FP8_GATE_UP = (2, 2048, 4)
FP8_DOWN = (16, 512, 4)
# The largest T * k this path takes without a table (the grouped kernel above it).
DEFAULT_MAX_ROWS = 32
GATE_UP, DOWN = "gate_up", "down"
# Tables keyed as the dense GEMV's: an expert's weight by output rows x input columns (gate/up's I x H for each of
# its two halves, down's H x I), "half" and "float8" sections.


def config_file_name(device_name: str) -> str:
    return f"moe_gemv,device={device_name.replace(' ', '_')}.json"



@functools.cache
def _device_table(device_index: int) -> dict | None:
    return load_table(os.path.join(CONFIG_DIR, config_file_name(torch.cuda.get_device_name(device_index))))


def _table_for(device: torch.device) -> dict | None:
    if device.type != "cuda":
        return None
    return _device_table(device.index if device.index is not None else torch.cuda.current_device())


def pick_config(table: dict | None, kernel: str, n: int, k: int, float8: bool) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) of `kernel` (GATE_UP or DOWN) for an n x k expert weight: the table's entry
    for the shape, else its default for the kernel, else the built-in one."""
    section = ((table or {}).get(FLOAT8 if float8 else HALF) or {}).get(kernel) or {}
    config = section.get(shape_key(n, k)) or section.get("default")
    if config is not None:
        return tuple(int(v) for v in config)
    if kernel == GATE_UP:
        return FP8_GATE_UP if float8 else DEFAULT_GATE_UP
    return FP8_DOWN if float8 else DEFAULT_DOWN


def pick_max_rows(table: dict | None, intermediate_size: int, hidden_size: int) -> int:
    """The table's crossover for experts of this shape (keyed by gate/up's I x H), else its default, else
    DEFAULT_MAX_ROWS."""
    section = (table or {}).get("max_rows") or {}
    # 0 is a measured answer (the grouped kernel always won), not a missing one.
    for key in (shape_key(intermediate_size, hidden_size), "default"):
        if section.get(key) is not None:
            return int(section[key])
    return DEFAULT_MAX_ROWS


def get_config(kernel: str, n: int, k: int, float8: bool, device: torch.device) -> tuple[int, int, int]:
    return pick_config(_table_for(device), kernel, n, k, float8)


def max_rows(intermediate_size: int, hidden_size: int, device: torch.device) -> int:
    """The largest T * k (tokens times experts per token) for which fused_experts takes this path on device. A GPU
    without a table (no `moe_tune.py --gemv` run on its kind yet) keeps the grouped kernel unless SERVAL_MOE_GEMV=1:
    these kernels have run only in Triton's interpreter so far, never compiled on a GPU."""
    table = _table_for(device)
    if device.type == "cuda" and table is None and os.environ.get("SERVAL_MOE_GEMV") != "1":
        return 0
    return pick_max_rows(table, intermediate_size, hidden_size)


def config_table_json(device_name: str, max_rows: dict[str, int], half: dict[str, dict[str, tuple[int, int, int]]],
                      float8: dict[str, dict[str, tuple[int, int, int]]]) -> str:
    """A table as get_config reads it: {"device", "max_rows": {"IxH" | "default": rows}, "half": {"gate_up" |
    "down": {"NxK" | "default": [BLOCK_N, BLOCK_K, num_warps]}}, "float8": {...}} (what benchmarks/moe_tune.py
    --gemv writes)."""
    def section(configs: dict) -> dict:
        return {kernel: {key: list(c) for key, c in shapes.items()} for kernel, shapes in configs.items()}
    return json.dumps({"device": device_name, "max_rows": max_rows, HALF: section(half), FLOAT8: section(float8)},
                      indent=1)


@triton.jit
def _load_rows(row_ptrs, offsets, K, EVEN_K: tl.constexpr):
    """A tile of weight rows (row_ptrs: any shape ending in 1) at columns offsets; read once, so not kept in L2."""
    if EVEN_K:
        return tl.load(row_ptrs + offsets, eviction_policy="evict_first")
    return tl.load(row_ptrs + offsets, mask=offsets < K, other=0.0, eviction_policy="evict_first")


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, expert_ids_ptr, act_ptr, num_slots, N, K, stride_x,
                    stride_we, stride_wn, stride_se, stride_be, stride_act, swiglu_alpha, swiglu_limit,
                    TOP_K: tl.constexpr, CLAMPED_SWIGLU: tl.constexpr, HAS_SCALE: tl.constexpr,
                    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    USE_PDL: tl.constexpr):
    """act[slot, n] = activation(gate_e . x_t, up_e . x_t) for slot = t * TOP_K + j, e = expert_ids[slot]. Gate rows
    [0, N) and up rows [N, 2N) of w[e], or (CLAMPED_SWIGLU, gpt-oss) gate row 2n and up row 2n + 1."""
    pid = tl.program_id(0)
    slot = pid % num_slots
    cols = (pid // num_slots) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < N
    # A column past N reads column N-1 again rather than masking: loads stay unmasked along K when K is even.
    safe_cols = tl.where(col_valid, cols, N - 1).to(tl.int64)
    if CLAMPED_SWIGLU:
        gate_rows = 2 * safe_cols
        up_rows = gate_rows + 1
    else:
        gate_rows = safe_cols
        up_rows = safe_cols + N
    offsets = tl.arange(0, BLOCK_K)
    # The expert id is the router's output, an earlier kernel's: nothing can be read before it.
    pdl.wait(USE_PDL)
    expert = tl.load(expert_ids_ptr + slot).to(tl.int64)
    x_row = x_ptr + (slot // TOP_K).to(tl.int64) * stride_x
    gate_ptrs = w_ptr + expert * stride_we + gate_rows[:, None] * stride_wn
    up_ptrs = w_ptr + expert * stride_we + up_rows[:, None] * stride_wn
    gate_partial = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    up_partial = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_row + k + offsets).to(tl.float32)
        else:
            x = tl.load(x_row + k + offsets, mask=k + offsets < K, other=0.0).to(tl.float32)
        gate_partial += _load_rows(gate_ptrs, k + offsets[None, :], K, EVEN_K).to(tl.float32) * x[None, :]
        up_partial += _load_rows(up_ptrs, k + offsets[None, :], K, EVEN_K).to(tl.float32) * x[None, :]
    gate = tl.sum(gate_partial, axis=1)
    up = tl.sum(up_partial, axis=1)
    if HAS_SCALE:
        gate *= tl.load(scale_ptr + expert * stride_se + gate_rows)
        up *= tl.load(scale_ptr + expert * stride_se + up_rows)
    if HAS_BIAS:
        gate += tl.load(bias_ptr + expert * stride_be + gate_rows).to(tl.float32)
        up += tl.load(bias_ptr + expert * stride_be + up_rows).to(tl.float32)
    # gate and up rounded to the model dtype first, as the reference's projection is.
    gate = gate.to(act_ptr.dtype.element_ty).to(tl.float32)
    up = up.to(act_ptr.dtype.element_ty).to(tl.float32)
    if CLAMPED_SWIGLU:
        gate = tl.minimum(gate, swiglu_limit)
        up = tl.minimum(tl.maximum(up, -swiglu_limit), swiglu_limit)
        act = (up + 1.0) * (gate * tl.sigmoid(gate * swiglu_alpha))
    else:
        act = gate * tl.sigmoid(gate) * up
    tl.store(act_ptr + slot.to(tl.int64) * stride_act + cols, act.to(act_ptr.dtype.element_ty), mask=col_valid)


@triton.jit
def _down_kernel(act_ptr, w_ptr, scale_ptr, bias_ptr, expert_ids_ptr, weights_ptr, out_ptr, num_tokens, N, K,
                 stride_act, stride_we, stride_wn, stride_se, stride_be, stride_out, TOP_K: tl.constexpr,
                 TOP_K_PAD: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    """out[t, n] = sum_j weights[t, j] * round(down_e[n] . act[t * TOP_K + j] (+ bias_e[n])), e = expert_ids[t, j]:
    the token's TOP_K experts side by side in one [TOP_K_PAD, BLOCK_N, BLOCK_K] tile."""
    pid = tl.program_id(0)
    token = (pid % num_tokens).to(tl.int64)
    cols = (pid // num_tokens) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < N
    safe_cols = tl.where(col_valid, cols, N - 1).to(tl.int64)
    picks = tl.arange(0, TOP_K_PAD)
    # Padding picks (k not a power of two) read pick 0's expert again, at weight 0: loads stay unmasked.
    slots = token * TOP_K + tl.where(picks < TOP_K, picks, 0)
    offsets = tl.arange(0, BLOCK_K)
    pdl.wait(USE_PDL)
    experts = tl.load(expert_ids_ptr + slots).to(tl.int64)
    w_ptrs = w_ptr + experts[:, None, None] * stride_we + safe_cols[None, :, None] * stride_wn
    act_ptrs = act_ptr + slots[:, None] * stride_act
    partial = tl.zeros((TOP_K_PAD, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            act = tl.load(act_ptrs + k + offsets[None, :]).to(tl.float32)
        else:
            act = tl.load(act_ptrs + k + offsets[None, :], mask=(k + offsets < K)[None, :], other=0.0).to(tl.float32)
        partial += _load_rows(w_ptrs, k + offsets[None, None, :], K, EVEN_K).to(tl.float32) * act[:, None, :]
    y = tl.sum(partial, axis=2)
    if HAS_SCALE:
        y *= tl.load(scale_ptr + experts[:, None] * stride_se + safe_cols[None, :])
    if HAS_BIAS:
        y += tl.load(bias_ptr + experts[:, None] * stride_be + safe_cols[None, :]).to(tl.float32)
    # Each expert's output rounded to the model dtype, weighted and summed in float32, as the reference does.
    y = y.to(out_ptr.dtype.element_ty).to(tl.float32)
    weights = tl.load(weights_ptr + slots, mask=picks < TOP_K, other=0.0)
    out = tl.sum(y * weights[:, None], axis=0)
    tl.store(out_ptr + token * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=col_valid)


def gate_up_gemv(hidden: torch.Tensor, gate_up_proj: torch.Tensor, expert_ids: torch.Tensor, *,
                 gate_up_bias: torch.Tensor | None = None, activation=None, gate_up_scale: torch.Tensor | None = None,
                 config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The activations [T * k, I] of each (token, chosen expert) slot, in slot order t * k + j. Arguments as
    fused_experts_gemv; config (BLOCK_N, BLOCK_K, num_warps), None: this GPU's tuned one."""
    num_tokens, hidden_size = hidden.shape
    intermediate_size = gate_up_proj.shape[1] // 2
    top_k = expert_ids.shape[1]
    num_slots = num_tokens * top_k
    act = torch.empty(num_slots, intermediate_size, dtype=hidden.dtype, device=hidden.device)
    block_n, block_k, num_warps = config or get_config(GATE_UP, intermediate_size, hidden_size,
                                                       gate_up_scale is not None, hidden.device)
    block_k = min(block_k, triton.next_power_of_2(hidden_size))
    alpha, limit = (1.0, 0.0) if activation is None else (float(activation.alpha), float(activation.limit))
    _gate_up_kernel[(num_slots * triton.cdiv(intermediate_size, block_n),)](
        hidden, gate_up_proj, _or(gate_up_scale, gate_up_proj), _or(gate_up_bias, gate_up_proj), expert_ids, act,
        num_slots, intermediate_size, hidden_size, hidden.stride(0), gate_up_proj.stride(0), gate_up_proj.stride(1),
        _row_stride(gate_up_scale), _row_stride(gate_up_bias), act.stride(0), alpha, limit, TOP_K=top_k,
        CLAMPED_SWIGLU=activation is not None, HAS_SCALE=gate_up_scale is not None,
        HAS_BIAS=gate_up_bias is not None, EVEN_K=hidden_size % block_k == 0, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, **pdl.launch_options(hidden))
    return act


def down_gemv(act: torch.Tensor, down_proj: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, *,
              down_bias: torch.Tensor | None = None, down_scale: torch.Tensor | None = None,
              config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """out [T, H] = sum_j weights[t, j] * down_e(act[t * k + j]) (+ bias), e = expert_ids[t, j], in act's dtype."""
    num_tokens, top_k = expert_ids.shape
    hidden_size, intermediate_size = down_proj.shape[1], down_proj.shape[2]
    out = torch.empty(num_tokens, hidden_size, dtype=act.dtype, device=act.device)
    block_n, block_k, num_warps = config or get_config(DOWN, hidden_size, intermediate_size, down_scale is not None,
                                                       act.device)
    top_k_pad = triton.next_power_of_2(top_k)
    # The table's BLOCK_N counts rows of all k experts: the tile keeps its size whatever k is.
    block_n = max(1, block_n // top_k_pad)
    block_k = min(block_k, triton.next_power_of_2(intermediate_size))
    _down_kernel[(num_tokens * triton.cdiv(hidden_size, block_n),)](
        act, down_proj, _or(down_scale, down_proj), _or(down_bias, down_proj), expert_ids, weights, out, num_tokens,
        hidden_size, intermediate_size, act.stride(0), down_proj.stride(0), down_proj.stride(1),
        _row_stride(down_scale), _row_stride(down_bias), out.stride(0), TOP_K=top_k, TOP_K_PAD=top_k_pad,
        HAS_SCALE=down_scale is not None, HAS_BIAS=down_bias is not None,
        EVEN_K=intermediate_size % block_k == 0, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
        **pdl.launch_options(act))
    return out


def fused_experts_gemv(hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, routing, *,
                       gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
                       activation=None, gate_up_scale: torch.Tensor | None = None,
                       down_scale: torch.Tensor | None = None, gate_up_config: tuple[int, int, int] | None = None,
                       down_config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """serval.kernels.triton_moe.fused_experts's contract (hidden [T, H], gate_up_proj [E, 2I, H], down_proj
    [E, H, I], routing with weights [T, k] float32 and expert_ids [T, k]; gpt-oss's biases and ClampedSwiGLU;
    float8 stacks with scales [E, 2I] and [E, H]) -> [T, H] in hidden's dtype, for small T * k."""
    if hidden.shape[0] == 0:
        return torch.empty_like(hidden)
    hidden, gate_up_proj, down_proj = hidden.contiguous(), gate_up_proj.contiguous(), down_proj.contiguous()
    expert_ids = routing.expert_ids.contiguous()
    gate_up_bias, down_bias, gate_up_scale, down_scale = (
        None if t is None else t.contiguous() for t in (gate_up_bias, down_bias, gate_up_scale, down_scale))
    act = gate_up_gemv(hidden, gate_up_proj, expert_ids, gate_up_bias=gate_up_bias, activation=activation,
                       gate_up_scale=gate_up_scale, config=gate_up_config)
    return down_gemv(act, down_proj, expert_ids, routing.weights.float().contiguous(), down_bias=down_bias,
                     down_scale=down_scale, config=down_config)


def _or(tensor: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """An optional operand, or any tensor in its place (the kernel never reads it: its HAS_ flag is off)."""
    return placeholder if tensor is None else tensor


def _row_stride(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.stride(0)
