"""The routing kernel (serval.kernels.triton_routing) against its torch references (serval.layers.moe.softmax_top_k,
top_k_softmax) and, through SparseMoeBlock.route on the Triton backend, against transformers' own routers: which
experts, which weights, for router sizes 8 to 256, top-k 1 to 8, batches 1 to 65, float32 and bfloat16, ties.
In Triton's interpreter on CPU, compiled on a GPU."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from serval.kernels import triton_routing  # noqa: E402
from serval.layers.moe import (ExpertRouting, route_top_k_softmax, routing_on_kernel, softmax_top_k,  # noqa: E402
                               top_k_softmax)
from tests.layers.test_moe import FAMILIES, TOP_K, matching_blocks, random_hidden  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_logits(num_tokens: int, num_experts: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    logits = 2 * torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(seed))
    return logits.to(DEVICE, dtype)


def by_expert_id(weights: torch.Tensor, expert_ids: torch.Tensor) -> ExpertRouting:
    """The routing with each row's picks in expert-id order: equal for two top-k's that break ties differently."""
    order = expert_ids.argsort(dim=-1)
    return ExpertRouting(weights.gather(1, order), expert_ids.gather(1, order))


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("num_experts,top_k", [(8, 1), (8, 2), (60, 4), (128, 8), (256, 8)])
@pytest.mark.parametrize("num_tokens", [1, 5, 65])
def test_softmax_top_k_float32(num_tokens, num_experts, top_k, renormalize):
    """Mixtral and Qwen (60 experts is Qwen2-MoE-A2.7B's router, 128 Qwen3-30B-A3B's): the same experts in the
    same order, weights within float32 rounding of the softmax's sum order."""
    logits = random_logits(num_tokens, num_experts, torch.float32, seed=num_tokens * num_experts + top_k)
    weights, expert_ids = triton_routing.route(logits, top_k, renormalize=renormalize)
    expected = softmax_top_k(logits.cpu(), top_k, renormalize)
    assert expert_ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(expert_ids.cpu(), expected.expert_ids)
    torch.testing.assert_close(weights.cpu(), expected.weights, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("num_tokens", [1, 7])
def test_half_precision_logits_with_weights_rounded_as_qwen_does(num_tokens, renormalize, dtype):
    """Qwen's routers round the top-k weights to the model dtype: the kernel's rounding is torch's (to nearest,
    ties to even), so the weights are the reference's bit for bit."""
    logits = random_logits(num_tokens, 128, dtype, seed=num_tokens)
    weights, expert_ids = triton_routing.route(logits, 8, renormalize=renormalize, round_weights=True)
    expected = softmax_top_k(logits.cpu(), 8, renormalize)
    assert torch.equal(expert_ids.cpu(), expected.expert_ids)
    assert torch.equal(weights.cpu(), expected.weights.to(dtype).float())


def test_ties_go_to_the_lowest_expert_ids():
    """Equal scores: the kernel picks the lowest expert ids (torch.topk's order among ties is unspecified, so the
    reference is checked by the set it picks from)."""
    logits = torch.tensor([[0.0] * 8, [1.0, 3.0, 3.0, 0.0, 3.0, 2.0, 2.0, 3.0]], device=DEVICE)
    weights, expert_ids = triton_routing.route(logits, 3, renormalize=True)
    assert expert_ids.tolist() == [[0, 1, 2], [1, 2, 4]]
    torch.testing.assert_close(weights.cpu(), torch.full((2, 3), 1 / 3), atol=1e-7, rtol=0)
    expected = softmax_top_k(logits.cpu(), 3, renormalize=True)
    assert set(expected.expert_ids[1].tolist()) <= {1, 2, 4, 7}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_experts,top_k", [(32, 4), (128, 4)])
def test_top_k_then_softmax_as_gpt_oss(num_experts, top_k, dtype):
    """gpt-oss: the k largest logits, the softmax over those k, rounded to the logits' dtype. bfloat16 logits tie
    often, and torch.topk orders ties its own way: compared with each row's picks in expert-id order."""
    logits = random_logits(9, num_experts, dtype, seed=num_experts)
    weights, expert_ids = triton_routing.route(logits, top_k, softmax_first=False,
                                               round_weights=dtype != torch.float32)
    expected = top_k_softmax(logits.cpu(), top_k)
    got, want = by_expert_id(weights.cpu(), expert_ids.cpu()), by_expert_id(expected.weights, expected.expert_ids)
    assert torch.equal(got.expert_ids, want.expert_ids)
    torch.testing.assert_close(got.weights, want.weights, atol=1e-6 if dtype == torch.float32 else 0,
                               rtol=1e-5 if dtype == torch.float32 else 0)


def test_rejects_routers_past_one_block():
    with pytest.raises(ValueError, match="at most 1024 experts"):
        triton_routing.route(torch.zeros(1, 2048, device=DEVICE), 2)
    with pytest.raises(ValueError, match="top_k in"):
        triton_routing.route(torch.zeros(1, 8, device=DEVICE), 9)


def test_nan_logits_still_give_expert_ids_in_range():
    """A NaN row (a diverged model) must not send the experts' kernels outside the weights."""
    logits = torch.tensor([[float("nan")] * 6, [0.0, float("nan"), 1.0, 2.0, 3.0, 4.0]], device=DEVICE)
    _, expert_ids = triton_routing.route(logits, 2, renormalize=True)
    assert ((expert_ids >= 0) & (expert_ids < 6)).all()


def test_empty_batch():
    weights, expert_ids = triton_routing.route(torch.zeros(0, 8, device=DEVICE), 2)
    assert weights.shape == expert_ids.shape == (0, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_block_routes_on_the_kernel_as_transformers(family, dtype, monkeypatch):
    """SparseMoeBlock.route with the experts on Triton takes the kernel, and picks transformers' router's experts
    with its weights (Qwen's rounded to bfloat16, Mixtral's float32)."""
    monkeypatch.setenv("SERVAL_MOE_BACKEND", "triton")
    config = FAMILIES[family][0]
    hf_block, block = matching_blocks(family, seed=4, std=0.3)
    block, hf_router = block.to(DEVICE, dtype), hf_block.gate.to(DEVICE, dtype)
    hidden = random_hidden(seed=5).to(DEVICE, dtype)
    calls, kernel_route = [], triton_routing.route

    def counted_route(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel_route(*args, **kwargs)

    monkeypatch.setattr(triton_routing, "route", counted_route)
    with torch.no_grad():
        _, hf_weights, hf_experts = hf_router(hidden)
        routing = block.route(hidden)
    assert calls == [(len(hidden), config.num_experts if family != "mixtral" else config.num_local_experts)]
    got, want = by_expert_id(routing.weights, routing.expert_ids), by_expert_id(hf_weights.float(), hf_experts)
    assert torch.equal(got.expert_ids, want.expert_ids) and routing.expert_ids.shape[1] == TOP_K
    if dtype == torch.bfloat16 and family != "mixtral":  # rounded weights: bit for bit
        assert torch.equal(got.weights, want.weights)
    else:  # float32 weights: within the softmax's sum order
        torch.testing.assert_close(got.weights, want.weights, atol=1e-6, rtol=1e-5)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_oss_routes_on_the_kernel_as_transformers(dtype, monkeypatch):
    """route_top_k_softmax (gpt-oss's MLP) with the experts on Triton: transformers' GptOssTopKRouter's experts
    and weights (compared in expert-id order: bfloat16 logits tie, and torch.topk orders ties its own way)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    from tests.model.tiny_models import tiny_config
    monkeypatch.setenv("SERVAL_MOE_BACKEND", "triton")
    config = tiny_config("gpt_oss", num_local_experts=16, num_experts_per_tok=4)
    torch.manual_seed(0)
    router = GptOssTopKRouter(config).to(DEVICE, dtype)
    with torch.no_grad():
        router.weight.normal_()
        router.bias.normal_()
        logits, want_weights, want_ids = router(torch.randn(50, config.hidden_size, device=DEVICE, dtype=dtype))
    assert routing_on_kernel(logits)
    routing = route_top_k_softmax(logits, config.num_experts_per_tok)
    got, want = by_expert_id(routing.weights, routing.expert_ids), by_expert_id(want_weights.float(), want_ids)
    assert torch.equal(got.expert_ids, want.expert_ids)
    torch.testing.assert_close(got.weights, want.weights, atol=1e-6 if dtype == torch.float32 else 0,
                               rtol=1e-5 if dtype == torch.float32 else 0)
