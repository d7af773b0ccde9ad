"""MixtralForCausalLM against transformers on tiny random weights: greedy tokens under engine pressure, prompt
logprobs, and both ways transformers 5 saves experts (per expert w1/w2/w3, or stacked gate_up_proj/down_proj)."""
from __future__ import annotations

import pytest
import torch

from serval.model.loader import load_model
from serval.model.mixtral import MixtralForCausalLM
from tests.model.engine_checks import check_greedy_matches_transformers, check_prompt_logprobs_match_transformers
from tests.model.tiny_models import build_tiny


@pytest.fixture(scope="module")
def mixtral(tiny_checkpoint):
    return tiny_checkpoint("mixtral")


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_greedy_matches_transformers(mixtral, prefix_caching):
    check_greedy_matches_transformers(*mixtral, prefix_caching)


def test_prompt_logprobs_match_transformers(mixtral):
    check_prompt_logprobs_match_transformers(*mixtral)


@pytest.mark.parametrize("save_original_format", [True, False], ids=["per-expert", "stacked"])
def test_both_checkpoint_layouts_load_to_the_same_logits(tmp_path, save_original_format):
    hf_model = build_tiny(tmp_path, "mixtral", seed=3, save_original_format=save_original_format)
    model, _ = load_model(str(tmp_path))
    assert isinstance(model, MixtralForCausalLM)
    # Every expert's weights landed in its slot of the stack.
    hf_experts = hf_model.model.layers[1].mlp.experts
    torch.testing.assert_close(model.model.layers[1].mlp.experts.gate_up_proj, hf_experts.gate_up_proj,
                               atol=0, rtol=0)
    torch.testing.assert_close(model.model.layers[1].mlp.experts.down_proj, hf_experts.down_proj, atol=0, rtol=0)


def test_missing_expert_is_named(tmp_path):
    from safetensors.torch import load_file, save_file
    build_tiny(tmp_path, "mixtral")
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing weights \[model\.layers\.0\.mlp\.experts\.2\.up_proj\.weight\]"):
        load_model(str(tmp_path))
