"""Fused mixture-of-experts in Triton: every routed expert of a batch in two grouped GEMMs and a combine, with no
Python loop over experts. Its torch reference is serval.layers.moe.fused_experts_reference (a loop over experts),
which CPU runs and the tests compare against in Triton's interpreter.

    1. align_by_expert (one small kernel): the batch's T*k (token, slot) pairs sorted by expert, each expert's
       run padded to a multiple of BLOCK_M, so that every BLOCK_M rows of the sorted list belong to one expert
       (padding rows point past the end and are masked);
    2. gate/up GEMM with SwiGLU fused: each program takes BLOCK_M sorted rows and BLOCK_N columns of the expert's
       intermediate, gathers the tokens' hidden rows, accumulates gate and up in float32 and writes only
       silu(gate) * up, [T*k, I] in slot order: the [T*k, 2I] gate/up output never reaches memory;
    3. down GEMM: the same over the activations, unweighted, [T*k, H] in the model dtype;
    4. combine: out[t] = sum_j weight[t, j] * down[t, j] in float32, the top-k weights applied here.

Options of the two GEMMs, all off for Mixtral and Qwen: gpt-oss's per-expert biases (added to the float32
accumulators) and its clamped SwiGLU over interleaved gate/up rows (ACTIVATION picks the epilogue); and float8
weights with a scale per expert and output row (quantization="fp8"; tiles widened to the activations' dtype,
scales applied to the accumulators).

Why: a loop over experts launches two GEMMs per expert that is hit (up to 128 per layer for Qwen3-30B-A3B) and
syncs to find which are; here the work is four kernels whatever the routing (the alignment is one kernel, not a
dozen torch ops, because at batch-1 decode each launch costs about what a layer's expert GEMMs do), each expert's weights are read once
per BLOCK_M tokens routed to it, and the shapes are static for a given batch size, so decode steps replay from
CUDA graphs. Block sizes come from a per-device table written by benchmarks/moe_tune.py
(serval/kernels/configs/), keyed by (experts, hidden, intermediate) and the batch size nearest the number of
tokens, with `default_config` for shapes without one.

Small batches (T * k up to a few dozen slots, i.e. decode) take serval.kernels.triton_moe_gemv instead: two GEMV
kernels that read each chosen expert's rows directly, without the alignment, the M padding and the combine.
`fused_experts` picks the path; `fused_experts_grouped` is the grouped one.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass

import torch
import triton
import triton.language as tl

from serval.kernels import triton_moe_gemv

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


@dataclass(frozen=True)
class MoeKernelConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


@dataclass
class ExpertBlocks:
    """The (token, slot) pairs of a batch sorted by expert and padded per expert to BLOCK_M rows."""
    sorted_slots: torch.Tensor  # [max_blocks * BLOCK_M] int32: slot t * k + j, or T * k for padding
    block_experts: torch.Tensor  # [max_blocks] int32: the expert of each BLOCK_M rows in use
    num_padded: torch.Tensor  # [1] int32: rows in use (a multiple of BLOCK_M)


def default_config(num_tokens: int, num_experts: int) -> MoeKernelConfig:
    """Without a tuned table: few tokens per expert (decode) want small M tiles and wide N to keep the grid full;
    many (prefill) want square tiles that reuse each loaded weight tile across more rows."""
    if num_tokens <= num_experts:
        return MoeKernelConfig(block_m=16, block_n=64, block_k=128, group_m=1, num_warps=4, num_stages=3)
    return MoeKernelConfig(block_m=64, block_n=64, block_k=64, group_m=8, num_warps=4, num_stages=3)


def config_file_name(num_experts: int, hidden_size: int, intermediate_size: int, device_name: str) -> str:
    return f"E={num_experts},H={hidden_size},I={intermediate_size},device={device_name.replace(' ', '_')}.json"


def read_table(path: str) -> dict[int, MoeKernelConfig] | None:
    """A tuned table as written by config_table_json, or None where there is none."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return {int(batch): MoeKernelConfig(**config) for batch, config in json.load(f).items()}


_load_table = functools.cache(read_table)  # the kernel reads a device's table once


def get_config(num_experts: int, hidden_size: int, intermediate_size: int, num_tokens: int,
               device: torch.device) -> MoeKernelConfig:
    """This device's tuned configuration for num_tokens (pick_config), or default_config without a table."""
    table = None
    if device.type == "cuda":
        name = config_file_name(num_experts, hidden_size, intermediate_size, torch.cuda.get_device_name(device))
        table = _load_table(os.path.join(CONFIG_DIR, name))
    return pick_config(table, num_tokens, num_experts)


def pick_config(table: dict[int, MoeKernelConfig] | None, num_tokens: int, num_experts: int) -> MoeKernelConfig:
    """The nearest tuned batch size's configuration, within a factor of two of the table's range; past it the
    default. A table tuned only up to 128 tokens (a sweep split over device calls, the first one done) took its
    decode tiles for 2,048-token prefills and made Qwen3-30B-A3B's 512 x (512, 256) run 25% slower on an H200."""
    if not table or not min(table) / 2 <= num_tokens <= max(table) * 2:
        return default_config(num_tokens, num_experts)
    return table[min(table, key=lambda batch: abs(batch - num_tokens))]


def config_table_json(table: dict[int, MoeKernelConfig]) -> str:
    """A table as get_config reads it (what benchmarks/moe_tune.py writes)."""
    return json.dumps({str(batch): asdict(config) for batch, config in sorted(table.items())}, indent=1)


def align_by_expert(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertBlocks:
    """Sort the T*k slots of expert_ids [T, k] by expert (slot order within an expert), each expert's run padded
    to a multiple of block_m. One kernel launch, static shapes for a given T, no host sync: the row count is
    bounded by cdiv(T*k, block_m) + min(E, T*k) blocks, since each expert used adds at most one partly filled
    block. Entries past num_padded are left unwritten (nothing reads them)."""
    flat = expert_ids.flatten()
    num_slots = flat.numel()
    max_blocks = triton.cdiv(num_slots, block_m) + min(num_experts, num_slots)
    sorted_slots = torch.empty(max_blocks * block_m, dtype=torch.int32, device=flat.device)
    block_experts = torch.empty(max_blocks, dtype=torch.int32, device=flat.device)
    num_padded = torch.empty(1, dtype=torch.int32, device=flat.device)
    # One bin more than there are experts: the bin that masked-off loads fall into.
    _align_kernel[(num_experts,)](flat, sorted_slots, block_experts, num_padded, num_slots, NUM_EXPERTS=num_experts,
                                  EXPERTS_PAD=triton.next_power_of_2(num_experts + 1), BLOCK_M=block_m,
                                  CHUNK=min(triton.next_power_of_2(num_slots), 1024))
    return ExpertBlocks(sorted_slots, block_experts, num_padded)


@triton.jit
def _align_kernel(expert_ids_ptr, sorted_slots_ptr, block_experts_ptr, num_padded_ptr, num_slots,
                  NUM_EXPERTS: tl.constexpr, EXPERTS_PAD: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    """Program e: count every expert's slots (a histogram; cheap next to the GEMMs, and it saves a second launch
    to share it), place expert e's run after the padded runs of experts 0..e-1, then write its slots, its
    padding rows and its blocks' expert id."""
    expert = tl.program_id(0)
    counts = tl.zeros((EXPERTS_PAD,), dtype=tl.int32)
    for start in range(0, num_slots, CHUNK):
        offsets = start + tl.arange(0, CHUNK)
        ids = tl.load(expert_ids_ptr + offsets, mask=offsets < num_slots, other=EXPERTS_PAD - 1).to(tl.int32)
        counts += tl.histogram(ids, EXPERTS_PAD)
    experts = tl.arange(0, EXPERTS_PAD)
    padded = tl.where(experts < NUM_EXPERTS, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    first_row = tl.sum(tl.where(experts < expert, padded, 0))
    count = tl.sum(tl.where(experts == expert, counts, 0))
    rows = tl.sum(tl.where(experts == expert, padded, 0))
    if expert == 0:
        tl.store(num_padded_ptr, tl.sum(padded))
    seen = tl.full((), 0, dtype=tl.int32)
    for start in range(0, num_slots, CHUNK):
        offsets = start + tl.arange(0, CHUNK)
        ids = tl.load(expert_ids_ptr + offsets, mask=offsets < num_slots, other=-1).to(tl.int32)
        mine = (ids == expert).to(tl.int32)
        rank = seen + tl.cumsum(mine, 0) - mine
        tl.store(sorted_slots_ptr + first_row + rank, offsets.to(tl.int32), mask=mine != 0)
        seen += tl.sum(mine)
    padding = tl.arange(0, BLOCK_M)
    tl.store(sorted_slots_ptr + first_row + count + padding, tl.full((BLOCK_M,), 0, tl.int32) + num_slots,
             mask=padding < rows - count)
    for block in range(0, rows // BLOCK_M):
        tl.store(block_experts_ptr + first_row // BLOCK_M + block, expert)


@triton.jit
def _dot_operand(x, DOT_IN_FLOAT32: tl.constexpr):
    if DOT_IN_FLOAT32:
        return x.to(tl.float32)
    return x


# What the gate/up GEMM's epilogue computes (the down GEMM's is NO_ACTIVATION). constexpr: the kernel reads them.
NO_ACTIVATION = tl.constexpr(0)
SILU_GATE_THEN_UP = tl.constexpr(1)
CLAMPED_SWIGLU_INTERLEAVED = tl.constexpr(2)


@triton.jit
def _expert_gemm_kernel(a_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, sorted_slots_ptr, block_experts_ptr,
                        num_padded_ptr, num_slots, N, K, stride_am, stride_we, stride_wn, stride_se, stride_be,
                        stride_om, swiglu_alpha, swiglu_limit, SLOTS_PER_A_ROW: tl.constexpr,
                        ACTIVATION: tl.constexpr, HAS_W_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, DOT_IN_FLOAT32: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr):
    """out[slot, n] = a[slot // SLOTS_PER_A_ROW] . w[expert, n] (+ bias[expert, n]) for the BLOCK_M sorted slots
    of this program's block. With SILU_GATE_THEN_UP, w holds gate rows [0, N) and up rows [N, 2N) and out gets
    silu(gate) * up; with CLAMPED_SWIGLU_INTERLEAVED (gpt-oss), gate rows 2n and up rows 2n + 1, and out gets
    (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit). With HAS_W_SCALE, w is float8
    and row n of expert e stands for w[e, n] * w_scale[e, n]: tiles are widened to a's dtype for the dot (float8
    e4m3 values are exact in it) and the scale multiplies the float32 accumulator, before the bias."""
    pid = tl.program_id(0)
    num_pid_m = tl.num_programs(0) // tl.cdiv(N, BLOCK_N)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row blocks share each column block of the weights while it is in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    slots = tl.load(sorted_slots_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    slot_valid = slots < num_slots
    a_rows = (slots // SLOTS_PER_A_ROW).to(tl.int64)
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < N
    # The weight rows that give output column n: itself, or its gate row and its up row.
    if ACTIVATION == CLAMPED_SWIGLU_INTERLEAVED:
        w_rows = 2 * cols
        up_rows = 2 * cols + 1
    else:
        w_rows = cols
        up_rows = cols + N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + expert * stride_we + w_rows[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [K, N] tile
    up_ptrs = w_ptr + expert * stride_we + up_rows[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_valid = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=slot_valid[:, None] & k_valid[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_valid[:, None] & col_valid[None, :], other=0.0)
        if HAS_W_SCALE:
            w = w.to(a_ptr.dtype.element_ty)
        if DOT_IN_FLOAT32:
            a = a.to(tl.float32)
        acc = tl.dot(a, _dot_operand(w, DOT_IN_FLOAT32), acc, input_precision=DOT_PRECISION)
        if ACTIVATION != NO_ACTIVATION:
            w_up = tl.load(up_ptrs, mask=k_valid[:, None] & col_valid[None, :], other=0.0)
            if HAS_W_SCALE:
                w_up = w_up.to(a_ptr.dtype.element_ty)
            acc_up = tl.dot(a, _dot_operand(w_up, DOT_IN_FLOAT32), acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    if HAS_W_SCALE:
        scale_ptrs = w_scale_ptr + expert * stride_se
        acc *= tl.load(scale_ptrs + w_rows, mask=col_valid, other=0.0)[None, :]
        if ACTIVATION != NO_ACTIVATION:
            acc_up *= tl.load(scale_ptrs + up_rows, mask=col_valid, other=0.0)[None, :]
    if HAS_BIAS:
        bias_ptrs = bias_ptr + expert * stride_be
        acc += tl.load(bias_ptrs + w_rows, mask=col_valid, other=0.0).to(tl.float32)[None, :]
        if ACTIVATION != NO_ACTIVATION:
            acc_up += tl.load(bias_ptrs + up_rows, mask=col_valid, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION != NO_ACTIVATION:
        # gate and up rounded to the model dtype first, as the reference's projection is.
        gate = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        up = acc_up.to(out_ptr.dtype.element_ty).to(tl.float32)
        if ACTIVATION == CLAMPED_SWIGLU_INTERLEAVED:
            gate = tl.minimum(gate, swiglu_limit)
            up = tl.minimum(tl.maximum(up, -swiglu_limit), swiglu_limit)
            acc = (up + 1.0) * (gate * tl.sigmoid(gate * swiglu_alpha))
        else:
            acc = gate * tl.sigmoid(gate) * up
    out_ptrs = out_ptr + slots[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=slot_valid[:, None] & col_valid[None, :])


@triton.jit
def _combine_kernel(expert_out_ptr, weights_ptr, out_ptr, H, stride_expert_out, stride_out,
                    TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        weight = tl.load(weights_ptr + token * TOP_K + j)
        row = tl.load(expert_out_ptr + (token * TOP_K + j) * stride_expert_out + cols, mask=mask, other=0.0)
        acc += weight * row.to(tl.float32)
    tl.store(out_ptr + token * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def fused_experts(hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, routing,
                  config: MoeKernelConfig | None = None, *, gate_up_bias: torch.Tensor | None = None,
                  down_bias: torch.Tensor | None = None, activation=None, gate_up_scale: torch.Tensor | None = None,
                  down_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The experts on the GPU (arguments as fused_experts_grouped): up to triton_moe_gemv.max_rows (token, expert)
    slots, the GEMV kernels that read each chosen expert's rows at bandwidth (decode); above, or with an explicit
    grouped config, the grouped GEMMs. T * k is a host-known shape: no sync, and each graph captures one path."""
    options = dict(gate_up_bias=gate_up_bias, down_bias=down_bias, activation=activation,
                   gate_up_scale=gate_up_scale, down_scale=down_scale)
    max_rows = triton_moe_gemv.max_rows(down_proj.shape[2], down_proj.shape[1], hidden.device)
    if config is None and hidden.shape[0] * routing.expert_ids.shape[1] <= max_rows:
        return triton_moe_gemv.fused_experts_gemv(hidden, gate_up_proj, down_proj, routing, **options)
    return fused_experts_grouped(hidden, gate_up_proj, down_proj, routing, config, **options)


def fused_experts_grouped(hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, routing,
                          config: MoeKernelConfig | None = None, *, gate_up_bias: torch.Tensor | None = None,
                          down_bias: torch.Tensor | None = None, activation=None,
                          gate_up_scale: torch.Tensor | None = None,
                          down_scale: torch.Tensor | None = None) -> torch.Tensor:
    """serval.layers.moe.fused_experts_reference: hidden [T, H], gate_up_proj [E, 2I, H], down_proj [E, H, I],
    routing (ExpertRouting: weights [T, k] float32, expert_ids [T, k]) -> [T, H] in hidden's dtype.
    gpt-oss: gate_up_bias [E, 2I], down_bias [E, H], and activation a ClampedSwiGLU (anything with `alpha` and
    `limit`), whose gate/up rows are interleaved; activation None is SiLU over gate rows then up rows.
    quantization="fp8": the weights float8 e4m3 with float32 scales per expert and output row, gate_up_scale
    [E, 2I] and down_scale [E, H]."""
    num_tokens, hidden_size = hidden.shape
    num_experts, intermediate_size = down_proj.shape[0], down_proj.shape[2]
    top_k = routing.expert_ids.shape[1]
    out = torch.empty_like(hidden)
    if num_tokens == 0:
        return out
    config = config or get_config(num_experts, hidden_size, intermediate_size, num_tokens, hidden.device)
    hidden, gate_up_proj, down_proj = hidden.contiguous(), gate_up_proj.contiguous(), down_proj.contiguous()
    blocks = align_by_expert(routing.expert_ids, num_experts, config.block_m)
    num_slots = num_tokens * top_k
    max_blocks = blocks.block_experts.numel()
    # Triton's interpreter multiplies bfloat16 tiles wrongly (numpy has no bfloat16): there, widen them first.
    # Exact either way: products of bfloat16 values are exact in float32.
    interpreted_bfloat16 = os.environ.get("TRITON_INTERPRET") == "1" and hidden.dtype == torch.bfloat16
    precision = "ieee" if hidden.dtype == torch.float32 or interpreted_bfloat16 else "tf32"
    launch = dict(DOT_PRECISION=precision, DOT_IN_FLOAT32=interpreted_bfloat16, BLOCK_M=config.block_m,
                  BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m, num_warps=config.num_warps,
                  num_stages=config.num_stages)
    if activation is None:
        gated, alpha, limit = SILU_GATE_THEN_UP.value, 1.0, 0.0
    else:
        gated, alpha, limit = CLAMPED_SWIGLU_INTERLEAVED.value, float(activation.alpha), float(activation.limit)
    gate_up_bias, down_bias, gate_up_scale, down_scale = (
        None if t is None else t.contiguous() for t in (gate_up_bias, down_bias, gate_up_scale, down_scale))
    activations = torch.empty(num_slots, intermediate_size, dtype=hidden.dtype, device=hidden.device)
    _expert_gemm_kernel[(max_blocks * triton.cdiv(intermediate_size, config.block_n),)](
        hidden, gate_up_proj, _or(gate_up_scale, gate_up_proj), _or(gate_up_bias, gate_up_proj), activations,
        blocks.sorted_slots, blocks.block_experts, blocks.num_padded, num_slots, intermediate_size, hidden_size,
        hidden.stride(0), gate_up_proj.stride(0), gate_up_proj.stride(1), _row_stride(gate_up_scale),
        _row_stride(gate_up_bias), activations.stride(0), alpha, limit, SLOTS_PER_A_ROW=top_k, ACTIVATION=gated,
        HAS_W_SCALE=gate_up_scale is not None, HAS_BIAS=gate_up_bias is not None, **launch)
    expert_out = torch.empty(num_slots, hidden_size, dtype=hidden.dtype, device=hidden.device)
    _expert_gemm_kernel[(max_blocks * triton.cdiv(hidden_size, config.block_n),)](
        activations, down_proj, _or(down_scale, down_proj), _or(down_bias, down_proj), expert_out,
        blocks.sorted_slots, blocks.block_experts, blocks.num_padded, num_slots, hidden_size, intermediate_size,
        activations.stride(0), down_proj.stride(0), down_proj.stride(1), _row_stride(down_scale),
        _row_stride(down_bias), expert_out.stride(0), 1.0, 0.0, SLOTS_PER_A_ROW=1, ACTIVATION=NO_ACTIVATION.value,
        HAS_W_SCALE=down_scale is not None, HAS_BIAS=down_bias is not None, **launch)
    block_h = min(triton.next_power_of_2(hidden_size), 1024)
    _combine_kernel[(num_tokens, triton.cdiv(hidden_size, block_h))](
        expert_out, routing.weights.float().contiguous(), out, hidden_size, expert_out.stride(0), out.stride(0),
        TOP_K=top_k, BLOCK_H=block_h)
    return out


def _or(tensor: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """An optional operand, or any tensor in its place (the kernel never reads it: its HAS_ flag is off)."""
    return placeholder if tensor is None else tensor


def _row_stride(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.stride(0)
