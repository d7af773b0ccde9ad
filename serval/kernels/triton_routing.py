"""Mixture-of-experts routing in one Triton kernel: a router's logits -> (top-k expert ids, their weights).
Its torch references are serval.layers.moe.softmax_top_k (Mixtral, Qwen2/3-MoE) and top_k_softmax (gpt-oss),
which CPU runs and the tests compare against in Triton's interpreter.

    softmax first (Mixtral, Qwen):  p = softmax(logits);  top k of p;  [w / sum(w)];  [rounded to the model dtype]
    top k first (gpt-oss):          top k of logits;  w = softmax(those k);  rounded to the logits' dtype

One program per token row holds the row's E logits (E <= MAX_EXPERTS, one block), takes the k largest by k rounds
of "maximum, then the lowest expert id holding it", and writes weights [T, k] float32 and expert_ids [T, k] int64
in descending order of weight, as torch.topk does. Equal scores go to the lowest ids (torch.topk leaves the order
of ties unspecified: the set it picks from is the same).

Why: the torch path is eight kernels a layer (cast, softmax, topk's two, sum, divide, two casts), each a few
microseconds at batch-1 decode, where the layer's expert GEMVs take about twenty (docs/models.md, "MoE decode").
Rows are independent, so the same kernel serves every batch size.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from serval.kernels import pdl

# One program holds a row's logits in registers; DeepSeek-V3's 256 experts is the largest router in use.
MAX_EXPERTS = 1024


@triton.jit
def _round_like(x, like_ptr, BFLOAT16: tl.constexpr):
    """float32 x rounded to like_ptr's dtype (to nearest, ties to even) and widened back. bfloat16 by its bits:
    Triton's interpreter truncates a float32 -> bfloat16 cast, and the tests compare against torch's rounding."""
    if BFLOAT16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return x.to(like_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _route_kernel(logits_ptr, weights_ptr, expert_ids_ptr, num_experts, stride_logits, TOP_K: tl.constexpr,
                  TOP_K_PAD: tl.constexpr, SOFTMAX_FIRST: tl.constexpr, RENORMALIZE: tl.constexpr,
                  ROUND_WEIGHTS: tl.constexpr, ROUND_BFLOAT16: tl.constexpr, BLOCK_E: tl.constexpr,
                  USE_PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    valid = experts < num_experts
    pdl.wait(USE_PDL)
    logits = tl.load(logits_ptr + row * stride_logits + experts, mask=valid, other=float("-inf")).to(tl.float32)
    if SOFTMAX_FIRST:
        exps = tl.exp(logits - tl.max(logits, axis=0))
        scores = exps / tl.sum(exps, axis=0)
    else:
        scores = logits
    # Padding experts score below any real one (a probability is >= 0; a logit is finite), so they are never picked.
    scores = tl.where(valid, scores, float("-inf"))
    picks = tl.arange(0, TOP_K_PAD)
    picked = tl.zeros((TOP_K_PAD,), dtype=tl.float32)
    picked_ids = tl.zeros((TOP_K_PAD,), dtype=tl.int64)
    for j in tl.static_range(TOP_K):
        best = tl.max(scores, axis=0)
        # A NaN row matches no maximum: its ids stay in range (the experts kernels index weights by them).
        expert = tl.minimum(tl.min(tl.where(scores == best, experts, BLOCK_E), axis=0), num_experts - 1)
        picked = tl.where(picks == j, best, picked)
        picked_ids = tl.where(picks == j, expert.to(tl.int64), picked_ids)
        scores = tl.where(experts == expert, float("-inf"), scores)
    in_top_k = picks < TOP_K
    if SOFTMAX_FIRST:
        weights = picked
        if RENORMALIZE:
            weights = weights / tl.sum(tl.where(in_top_k, weights, 0.0), axis=0)
    else:
        # picked[0] is the largest of the k: the softmax over them needs no other maximum.
        exps = tl.where(in_top_k, tl.exp(picked - tl.max(tl.where(in_top_k, picked, float("-inf")), axis=0)), 0.0)
        weights = exps / tl.sum(exps, axis=0)
    if ROUND_WEIGHTS:
        weights = _round_like(weights, logits_ptr, ROUND_BFLOAT16)
    tl.store(weights_ptr + row * TOP_K + picks, weights, mask=in_top_k)
    tl.store(expert_ids_ptr + row * TOP_K + picks, picked_ids, mask=in_top_k)


def route(router_logits: torch.Tensor, top_k: int, *, softmax_first: bool = True, renormalize: bool = False,
          round_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, expert_ids [T, k] int64) of router_logits [T, E] (E <= MAX_EXPERTS).
    softmax_first: softmax over all experts in float32, then the top k, renormalized to sum to one if renormalize
    (serval.layers.moe.softmax_top_k); otherwise the top k logits, then the softmax over those k
    (top_k_softmax, gpt-oss). round_weights: the weights rounded to the logits' dtype, as Qwen's routers and
    gpt-oss's do."""
    num_tokens, num_experts = router_logits.shape
    if num_experts > MAX_EXPERTS or not 0 < top_k <= num_experts:
        raise ValueError(f"routing takes top_k in [1, {num_experts}] of at most {MAX_EXPERTS} experts; got top_k "
                         f"{top_k} of {num_experts}")
    if router_logits.stride(-1) != 1:
        router_logits = router_logits.contiguous()
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    expert_ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=router_logits.device)
    if num_tokens:
        block_e = triton.next_power_of_2(num_experts)
        _route_kernel[(num_tokens,)](
            router_logits, weights, expert_ids, num_experts, router_logits.stride(0), TOP_K=top_k,
            TOP_K_PAD=triton.next_power_of_2(top_k), SOFTMAX_FIRST=softmax_first, RENORMALIZE=renormalize,
            ROUND_WEIGHTS=round_weights, ROUND_BFLOAT16=router_logits.dtype == torch.bfloat16, BLOCK_E=block_e,
            num_warps=1 if block_e <= 256 else 4, **pdl.launch_options(router_logits))
    return weights, expert_ids
