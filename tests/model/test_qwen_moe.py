"""Qwen2MoeForCausalLM (shared expert with a sigmoid gate, a dense layer by mlp_only_layers) and
Qwen3MoeForCausalLM (q/k norm, norm_topk_prob, a dense layer by decoder_sparse_step) against transformers on tiny
random weights: greedy tokens under engine pressure and prompt logprobs."""
from __future__ import annotations

import pytest

from serval.layers.mlp import GatedMLP
from serval.layers.moe import SparseMoeBlock
from serval.model.loader import load_model
from tests.model.engine_checks import (check_greedy_matches_transformers, check_prompt_logprobs_match_transformers,
                                       check_two_prompts_greedy_match_transformers)
from tests.model.tiny_models import build_tiny

ARCHS = ["qwen2_moe", "qwen3_moe"]


@pytest.fixture(scope="module")
def qwen_moe(tiny_checkpoint):
    return tiny_checkpoint


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(qwen_moe, arch, prefix_caching):
    check_greedy_matches_transformers(*qwen_moe(arch), prefix_caching)


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_logprobs_match_transformers(qwen_moe, arch):
    check_prompt_logprobs_match_transformers(*qwen_moe(arch))


@pytest.mark.parametrize("arch,sparse", [("qwen2_moe", [True, False]), ("qwen3_moe", [False, True])])
def test_dense_and_sparse_layers_follow_the_config(qwen_moe, arch, sparse):
    model, _ = load_model(qwen_moe(arch)[0])
    kinds = [type(layer.mlp) for layer in model.model.layers]
    assert kinds == [SparseMoeBlock if s else GatedMLP for s in sparse]
    sparse_blocks = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, SparseMoeBlock)]
    assert [block.shared_expert is not None for block in sparse_blocks] == [arch == "qwen2_moe"]


def test_stacked_experts_checkpoint_loads(tmp_path):
    hf_model = build_tiny(tmp_path, "qwen2_moe", seed=4, save_original_format=False)
    check_prompt_logprobs_match_transformers(str(tmp_path), hf_model)


def test_fused_moe_kernel_in_the_engine_matches_transformers(qwen_moe, monkeypatch):
    """The whole engine with the experts on the Triton kernel (the interpreter here, compiled on a GPU)."""
    triton_moe = pytest.importorskip("serval.kernels.triton_moe")
    monkeypatch.setenv("SERVAL_MOE_BACKEND", "triton")
    llm = check_two_prompts_greedy_match_transformers(*qwen_moe("qwen2_moe"))
    block = llm.engine.model.model.layers[0].mlp
    assert block.experts._backend is triton_moe.fused_experts
