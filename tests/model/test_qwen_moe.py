"""Qwen2MoeForCausalLM (shared expert with a sigmoid gate, a dense layer by mlp_only_layers) and
Qwen3MoeForCausalLM (q/k norm, norm_topk_prob, a dense layer by decoder_sparse_step) against transformers on tiny
random weights: greedy tokens under engine pressure and prompt logprobs."""
from __future__ import annotations

import pytest

from serval.layers.mlp import GatedMLP
from serval.layers.moe import SparseMoeBlock
from serval.model.loader import load_model
from tests.model.moe_support import (build_tiny_moe, check_greedy_matches_transformers,
                                     check_prompt_logprobs_match_transformers)

ARCHS = ["qwen2_moe", "qwen3_moe"]


@pytest.fixture(scope="module")
def qwen_moe(tmp_path_factory):
    built = {}

    def get(arch: str):
        if arch not in built:
            path = tmp_path_factory.mktemp(arch)
            built[arch] = (str(path), build_tiny_moe(path, arch))
        return built[arch]

    return get


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
    hf_model = build_tiny_moe(tmp_path, "qwen2_moe", seed=4, save_original_format=False)
    check_prompt_logprobs_match_transformers(str(tmp_path), hf_model)
