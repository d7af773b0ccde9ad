"""The sparse-MoE layer against transformers' own modules on random hidden states: each family's router (which
experts, which weights), the experts' weighted sum, and Qwen2-MoE's shared expert with its sigmoid gate."""
from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.mixtral import modeling_mixtral
from transformers.models.qwen2_moe import modeling_qwen2_moe
from transformers.models.qwen3_moe import modeling_qwen3_moe

from serval.layers.moe import SparseMoeBlock, fused_experts_reference, softmax_top_k

HIDDEN, EXPERTS, TOP_K, INTERMEDIATE, SHARED = 48, 8, 3, 24, 40

FAMILIES = {
    # name: (config, transformers' router class, transformers' MoE block class, renormalize)
    "mixtral": (transformers.MixtralConfig(hidden_size=HIDDEN, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
                                           intermediate_size=INTERMEDIATE),
                modeling_mixtral.MixtralTopKRouter, modeling_mixtral.MixtralSparseMoeBlock, True),
    "qwen2_moe": (transformers.Qwen2MoeConfig(hidden_size=HIDDEN, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                                              moe_intermediate_size=INTERMEDIATE,
                                              shared_expert_intermediate_size=SHARED),
                  modeling_qwen2_moe.Qwen2MoeTopKRouter, modeling_qwen2_moe.Qwen2MoeSparseMoeBlock, False),
    "qwen3_moe": (transformers.Qwen3MoeConfig(hidden_size=HIDDEN, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                                              moe_intermediate_size=INTERMEDIATE, norm_topk_prob=True),
                  modeling_qwen3_moe.Qwen3MoeTopKRouter, modeling_qwen3_moe.Qwen3MoeSparseMoeBlock, True),
}


def random_hidden(num_tokens: int = 37, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))


def test_config_defaults_are_the_families_semantics():
    """Qwen2-MoE leaves top-k unnormalized unless asked; our Mixtral always renormalizes (its router has no flag)."""
    assert transformers.Qwen2MoeConfig().norm_topk_prob is False
    assert not hasattr(transformers.MixtralConfig(), "norm_topk_prob")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_router_picks_transformers_experts_and_weights(family):
    config, router_class, _, renormalize = FAMILIES[family]
    torch.manual_seed(1)
    router = router_class(config)
    torch.nn.init.normal_(router.weight, std=0.3)
    hidden = random_hidden()
    _, hf_weights, hf_experts = router(hidden)
    routing = softmax_top_k(torch.nn.functional.linear(hidden, router.weight), TOP_K, renormalize)
    assert torch.equal(routing.expert_ids, hf_experts)
    torch.testing.assert_close(routing.weights, hf_weights.float(), atol=1e-6, rtol=1e-6)
    sums = routing.weights.sum(-1)
    if renormalize:
        torch.testing.assert_close(sums, torch.ones_like(sums))
    else:
        assert (sums < 1).all()  # Qwen2-MoE's default: the top-k probabilities as the softmax gave them


def our_block(family: str) -> SparseMoeBlock:
    config, _, _, renormalize = FAMILIES[family]
    return SparseMoeBlock(HIDDEN, EXPERTS, TOP_K, INTERMEDIATE, renormalize,
                          shared_expert_intermediate_size=SHARED if family == "qwen2_moe" else 0,
                          weights_in_model_dtype=family != "mixtral")


def matching_blocks(family: str, seed: int, std: float):
    """transformers' block with random weights (normal, std) and ours holding the same: (hf_block, block)."""
    config, _, block_class, _ = FAMILIES[family]
    torch.manual_seed(seed)
    hf_block = block_class(config).eval()
    for param in hf_block.parameters():
        torch.nn.init.normal_(param, std=std)
    block = our_block(family)
    copy_weights(hf_block, block)
    return hf_block, block


def copy_weights(hf_block, block: SparseMoeBlock) -> None:
    block.gate.weight.data.copy_(hf_block.gate.weight)
    block.experts.gate_up_proj.data.copy_(hf_block.experts.gate_up_proj)
    block.experts.down_proj.data.copy_(hf_block.experts.down_proj)
    if block.shared_expert is not None:
        shared = hf_block.shared_expert
        block.shared_expert.gate_up_proj.weight.data.copy_(torch.cat([shared.gate_proj.weight, shared.up_proj.weight]))
        block.shared_expert.down_proj.weight.data.copy_(shared.down_proj.weight)
        block.shared_expert_gate.weight.data.copy_(hf_block.shared_expert_gate.weight)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_block_matches_transformers(family):
    """Router, experts and (Qwen2-MoE) the sigmoid-gated shared expert: the block's output equals transformers'."""
    hf_block, block = matching_blocks(family, seed=2, std=0.2)
    hidden = random_hidden(seed=3)
    with torch.no_grad():
        expected = hf_block(hidden[None])[0]
        got = block(hidden)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_reference_skips_unused_experts_and_weights_each_pick():
    """One token, experts 1 and 3 of 4 with weights 0.75 / 0.25: the weighted sum of those two MLPs alone."""
    gate_up = torch.randn(4, 2 * INTERMEDIATE, HIDDEN)
    down = torch.randn(4, HIDDEN, INTERMEDIATE)
    x = random_hidden(1)
    routing = softmax_top_k(torch.tensor([[0.0, 2.0, -9.0, 2.0 - torch.log(torch.tensor(3.0)).item()]]), 2, True)
    assert routing.expert_ids.tolist() == [[1, 3]]

    def mlp(e: int) -> torch.Tensor:
        gate, up = (x @ gate_up[e].T).chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * up) @ down[e].T

    torch.testing.assert_close(fused_experts_reference(x, gate_up, down, routing), 0.75 * mlp(1) + 0.25 * mlp(3),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_block_routing_weights_in_bfloat16_are_transformers(family):
    """In half precision the routers differ: Qwen's round the top-k weights to the model dtype, Mixtral's don't."""
    config, router_class, _, _ = FAMILIES[family]
    torch.manual_seed(4)
    router = router_class(config).to(torch.bfloat16)
    torch.nn.init.normal_(router.weight, std=0.3)
    block = our_block(family).to(torch.bfloat16)
    block.gate.weight.data.copy_(router.weight)
    hidden = random_hidden(seed=5).to(torch.bfloat16)
    _, hf_weights, hf_experts = router(hidden)
    routing = block.route(hidden)
    assert torch.equal(routing.expert_ids, hf_experts)
    assert hf_weights.dtype == (torch.float32 if family == "mixtral" else torch.bfloat16)
    torch.testing.assert_close(routing.weights, hf_weights.float(), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_oss_experts_with_biases_and_clamped_swiglu_equal_transformers(dtype):
    """FusedMoE(bias=True, activation=ClampedSwiGLU) against transformers' GptOssExperts: its [E, H, 2I] weights
    (gate/up interleaved) transposed into ours, random biases, a limit low enough to clamp."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from serval.layers.moe import ClampedSwiGLU, FusedMoE, top_k_softmax
    config = transformers.GptOssConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_local_experts=EXPERTS,
                                       num_experts_per_tok=TOP_K, swiglu_limit=0.6)
    torch.manual_seed(0)
    theirs = GptOssExperts(config).to(dtype)
    ours = FusedMoE(EXPERTS, HIDDEN, INTERMEDIATE, bias=True, activation=ClampedSwiGLU(getattr(config, "swiglu_alpha", 1.702), 0.6))
    with torch.no_grad():
        for param in theirs.parameters():
            param.normal_(0.0, 0.3)
        ours.to(dtype)
        ours.gate_up_proj.copy_(theirs.gate_up_proj.transpose(1, 2))
        ours.down_proj.copy_(theirs.down_proj.transpose(1, 2))
        ours.gate_up_proj_bias.copy_(theirs.gate_up_proj_bias)
        ours.down_proj_bias.copy_(theirs.down_proj_bias)
    hidden = torch.randn(40, HIDDEN, dtype=dtype)
    routing = top_k_softmax(torch.randn(40, EXPERTS, dtype=dtype), TOP_K)
    with torch.no_grad():
        want = theirs(hidden, routing.expert_ids, routing.weights.to(dtype))
        got = ours(hidden, routing)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)
    ours.activation = ClampedSwiGLU(getattr(config, "swiglu_alpha", 1.702), 1e9)
    with torch.no_grad():
        assert not torch.allclose(ours(hidden, routing).float(), want.float(), atol=0.05)
