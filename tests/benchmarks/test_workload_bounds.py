"""benchmarks/workload_bounds.py and model_shape.py: their FLOP counts against torch's FlopCounterMode on
transformers' Llama, Mixtral and Qwen3-MoE, their weight bytes against those models' parameters, the expected
experts a step hits against random top-k draws, and the ideal scheduler against the totals any schedule of the
workload must add up to."""
from __future__ import annotations

import json
import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import workload_bounds
from benchmarks.model_shape import expected_experts_hit, shape_from_config
from benchmarks.workload_bounds import schedule

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 160,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3, "vocab_size": 512,
        "max_position_embeddings": 256, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    path = tmp_path_factory.mktemp("bounds")
    (path / "config.json").write_text(json.dumps(TINY))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, attn_implementation="eager")).eval()
    return shape_from_config(str(path)), model


def counted(model, **inputs) -> dict[str, int]:
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model(**inputs)
    return {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}


def test_linear_and_attention_flops_match_torch_counting_transformers_llama(tiny):
    from transformers import DynamicCache
    shape, model = tiny
    prompt = torch.randint(0, TINY["vocab_size"], (1, 37))
    cache = DynamicCache(config=model.config)
    prefill = counted(model, input_ids=prompt, cache=cache, use_cache=True)
    # eager attention: its QK^T and PV are the bmm, every projection and the head an mm
    assert prefill["aten.mm"] == 2 * (shape.linear_params + shape.head_params) * 37  # the head on every row here
    assert prefill["aten.bmm"] == shape.attention_flops(37 * 37)  # eager multiplies the masked square too
    decode = counted(model, input_ids=torch.randint(0, TINY["vocab_size"], (1, 1)), cache=cache,
                     use_cache=True)
    assert decode["aten.mm"] == 2 * (shape.linear_params + shape.head_params)
    assert decode["aten.bmm"] == shape.attention_flops(38)  # one query over the 37 cached keys and its own


@pytest.mark.parametrize("max_num_seqs,budget", [(4, 64), (3, 50), (256, 8192)])
def test_ideal_schedule_adds_up_to_the_workload(max_num_seqs, budget):
    rng = random.Random(max_num_seqs)
    prompt_lens = [rng.randint(1, 120) for _ in range(17)]
    output_lens = [rng.randint(1, 30) for _ in range(17)]
    steps = schedule(prompt_lens, output_lens, max_num_seqs, budget)
    assert all(step.num_tokens <= budget for step in steps)
    assert all(step.num_sampled <= max_num_seqs for step in steps)
    decode_rows = sum(length - 1 for length in output_lens)
    assert sum(step.num_tokens for step in steps) == sum(prompt_lens) + decode_rows
    assert sum(step.num_sampled for step in steps) == sum(output_lens)
    assert sum(step.prefill_keys for step in steps) == sum(n * (n + 1) // 2 for n in prompt_lens)
    assert sum(step.decode_keys for step in steps) == sum(p + g for p, o in zip(prompt_lens, output_lens)
                                                          for g in range(1, o))
    # a request decodes one token a step: the longest output needs that many steps after its prefill
    assert len(steps) >= max(output_lens)


def test_interpolate_hits_measured_points_and_extends_the_last_segment():
    table = {"rows": [1, 4, 8], "ms": [1.0, 2.0, 4.0]}
    assert [workload_bounds.interpolate(table, r) for r in (1, 4, 8)] == [1.0, 2.0, 4.0]
    assert workload_bounds.interpolate(table, 6) == 3.0
    assert workload_bounds.interpolate(table, 12) == 6.0


TINY_MOE = {
    # every layer has 4 experts, 2 a token; each expert's MLP is intermediate_size wide
    "mixtral": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 64,
                "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
                "vocab_size": 512, "max_position_embeddings": 256, "num_local_experts": 4,
                "num_experts_per_tok": 2, "tie_word_embeddings": False},
    # experts on layer 1 only ((i + 1) % 2 == 0, layer 3 dense by mlp_only_layers): dense and MoE layers both count
    "qwen3_moe": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 64,
                  "intermediate_size": 160, "moe_intermediate_size": 48, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 32, "num_hidden_layers": 4, "vocab_size": 512,
                  "max_position_embeddings": 256, "num_experts": 8, "num_experts_per_tok": 3,
                  "decoder_sparse_step": 2, "mlp_only_layers": [3], "tie_word_embeddings": False},
}


@pytest.fixture(scope="module", params=sorted(TINY_MOE))
def tiny_moe(request, tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM
    config = TINY_MOE[request.param]
    path = tmp_path_factory.mktemp(request.param)
    (path / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    # eager experts: transformers' loop runs each hit expert on exactly the tokens routed to it
    hf_config = AutoConfig.for_model(**config, attn_implementation="eager", experts_implementation="eager")
    return shape_from_config(str(path)), AutoModelForCausalLM.from_config(hf_config).eval()


def test_moe_flops_match_torch_counting_transformers(tiny_moe):
    """Whatever the routing, every token runs its router and exactly k experts, so what the model ran adds up to
    tokens x active parameters."""
    from transformers import DynamicCache
    shape, model = tiny_moe
    prompt = torch.randint(0, shape.vocab_size, (1, 37))
    cache = DynamicCache(config=model.config)
    prefill = counted(model, input_ids=prompt, cache=cache, use_cache=True)
    assert prefill["aten.mm"] == 2 * (shape.linear_params + shape.head_params) * 37
    assert prefill["aten.bmm"] == shape.attention_flops(37 * 37)
    decode = counted(model, input_ids=torch.randint(0, shape.vocab_size, (1, 1)), cache=cache,
                     use_cache=True)
    assert decode["aten.mm"] == 2 * (shape.linear_params + shape.head_params)
    assert decode["aten.bmm"] == shape.attention_flops(38)


def test_moe_weight_bytes_are_the_models_matrices_less_the_experts_not_hit(tiny_moe):
    shape, model = tiny_moe
    # the embedding is gathered, not read whole; norms (the 1-D weights) are left out of the bound
    matrices = {name: p.numel() for name, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in name}
    expert_weights = sum(n for name, n in matrices.items() if ".experts." in name)
    experts = shape.num_experts
    assert shape.weight_bytes("bf16", 10**6) == pytest.approx(2 * sum(matrices.values()))
    one_token = sum(matrices.values()) - expert_weights * (experts - shape.experts_per_token) // experts
    assert shape.weight_bytes("bf16", 1) == pytest.approx(2 * one_token)
    assert shape.weight_bytes("fp8", 1) == pytest.approx(one_token + shape.head_params)  # the head stays bf16


@pytest.mark.parametrize("experts,top_k", [(8, 2), (128, 8)])
def test_expected_experts_hit_matches_random_top_k_draws(experts, top_k):
    generator = torch.Generator().manual_seed(experts)
    trials = 400
    for num_tokens in (1, 2, 5, 16, 64, 256):
        # a uniformly random top-k a token: the k largest of E independent uniforms
        chosen = torch.rand(trials, num_tokens, experts, generator=generator).topk(top_k, dim=-1).indices
        hit = torch.zeros(trials, experts).scatter_(1, chosen.view(trials, -1), 1.0).sum(dim=1)
        tolerance = 5 * hit.std().item() / trials ** 0.5 + 1e-3  # all E hit: no spread
        expected = expected_experts_hit(experts, top_k, num_tokens)
        assert abs(hit.mean().item() - expected) <= tolerance, (num_tokens, hit.mean().item(), expected)
        assert top_k <= expected <= experts


@pytest.mark.parametrize("model,suite", [
    ("mixtral-8x7b", "gpu_suite_h200_mixtral_vs_hf_2026-12-03.json"),
    ("qwen3-30b-a3b", "gpu_suite_h200_qwen3_30b_a3b_generate_batch.json")])
def test_real_moe_shapes_read_what_serval_counted_at_batch_one(model, suite):
    """gpu_suite.py counted Serval's loaded parameters on the H200: a token reads them all but the embedding and
    the E - k unhit experts a layer. The bound leaves out only the norms (under 0.01%)."""
    shape = shape_from_config(f"benchmarks/configs/{model}")
    with open(f"docs/results/{suite}") as f:
        roofline = json.load(f)["roofline"]
    assert shape.weight_bytes("bf16", 1) == pytest.approx(roofline["weight_bytes_read"], rel=1e-4)


def test_versus_transformers_bounds_the_suites_own_workload_and_settings():
    with open("docs/results/h200_rates_measured.json") as f:
        rates = json.load(f)
    suite = {"model": "benchmarks/configs/mixtral-8x7b", "quantization": None, "max_num_seqs": 4,
             "max_num_batched_tokens": 64, "hf_generate_batch_512x512x256": {"output_tokens_per_s": 10.0},
             "serval_512x512x256": {"num_requests": 8, "input_tokens": 8 * 32, "output_tokens": 8 * 8,
                                    "output_tokens_per_s": 300.0}}
    entry = workload_bounds.versus_transformers(suite, rates)
    steps = schedule([32] * 8, [8] * 8, 4, 64)
    expected = workload_bounds.bound(shape_from_config(suite["model"]), "bf16", steps, rates)
    assert entry["bound"]["sequential_s"] == expected["sequential_s"]
    assert entry["bound"]["strict_s"] == expected["strict_s"]
    ceiling = 64 / expected["sequential_s"]
    assert entry["serval_of_sequential"] == pytest.approx(300 / ceiling)
    assert entry["most_over_transformers_sequential"] == pytest.approx(ceiling / 10)
    assert entry["goal_needs_of_sequential"] == pytest.approx(20 * 10 / ceiling)
    with pytest.raises(ValueError, match="awq"):
        workload_bounds.versus_transformers(dict(suite, quantization="awq"), rates)
