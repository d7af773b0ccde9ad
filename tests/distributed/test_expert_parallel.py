"""Mixture-of-experts models across two ranks (CPU, gloo): gpt-oss with its experts split by rows (sinks split with
the heads, the down bias added once) and every MoE family with expert parallelism (enable_expert_parallel: each
rank holds E/N whole experts, the router whole). Greedy tokens equal transformers' and tensor_parallel_size=1's
under batching, chunked prefill, preemption and prefix caching; each rank loads exactly its experts."""
from __future__ import annotations

import pytest
import torch

from serval import LLM
from serval.distributed.weights import load_rank_model
from serval.layers.parallel import ShardedFusedMoE, shard_layout
from serval.openai.errors import InvalidArgument
from tests.conftest import build_tiny_model
from tests.distributed.test_tensor_parallel import greedy_checked_tp_llm
from tests.model.tiny_models import build_tiny, tiny_config

TP = 2
# family -> (build_tiny overrides, engine arguments)
CASES = {
    # Experts split by rows: the interleaved gate/up columns and their biases sliced, the down bias on rank 0.
    "gpt_oss-sliced": ("gpt_oss", {}, {}),
    # Two of four whole experts a rank; each expert's biases with it.
    "gpt_oss-expert-parallel": ("gpt_oss", {}, dict(enable_expert_parallel=True)),
    # Mixtral's per-expert w1/w2/w3 (a rank reads only its experts', renumbered); Qwen3-MoE's stacked experts
    # (a rank reads its rows of dim 0), a dense layer among sparse ones; Qwen2-MoE's shared expert stays split by
    # rows, its partial sum joining the experts' before the one all-reduce.
    "mixtral-expert-parallel": ("mixtral", dict(save_original_format=True), dict(enable_expert_parallel=True)),
    "qwen3_moe-stacked-expert-parallel": ("qwen3_moe", dict(save_original_format=False),
                                          dict(enable_expert_parallel=True)),
    "qwen2_moe-expert-parallel": ("qwen2_moe", dict(save_original_format=True), dict(enable_expert_parallel=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers_and_tp1(tmp_path, case):
    family, overrides, engine_args = CASES[case]
    hf_model = build_tiny(tmp_path, family, **overrides)
    with greedy_checked_tp_llm(str(tmp_path), hf_model, **engine_args) as llm:
        experts = [m for m in llm.engine.model.modules() if isinstance(m, ShardedFusedMoE)]
        assert experts and all(m.expert_parallel == bool(engine_args) for m in experts)


def hf_experts(hf_model, layer: int):
    """A sparse layer's experts as transformers holds them (stacked, per family's layout) and its router."""
    mlp = hf_model.model.layers[layer].mlp
    return mlp.experts, getattr(mlp, "gate", None) or mlp.router


@pytest.mark.parametrize("family, save_original_format, layer", [
    ("mixtral", True, 0), ("qwen3_moe", False, 1), ("gpt_oss", True, 0),
], ids=["mixtral-per-expert", "qwen3_moe-stacked", "gpt_oss"])
def test_each_rank_holds_its_whole_experts(tmp_path, family, save_original_format, layer):
    hf_model = build_tiny(tmp_path, family, save_original_format=save_original_format)
    theirs, router = hf_experts(hf_model, layer)
    num_experts = hf_model.config.num_local_experts if family != "qwen3_moe" else hf_model.config.num_experts
    for rank in range(TP):
        layout = shard_layout(hf_model.config, rank, TP, expert_parallel=True)
        model = load_rank_model(str(tmp_path), layout, load_format="auto", dtype=torch.float32,
                                device=torch.device("cpu"), seed=0)
        mlp = model.model.layers[layer].mlp
        ours = mlp.experts
        owned = slice(rank * num_experts // TP, (rank + 1) * num_experts // TP)
        assert ours.num_experts == num_experts // TP and ours.first_expert == owned.start
        gate_up, down = theirs.gate_up_proj[owned], theirs.down_proj[owned]
        if family == "gpt_oss":  # transformers keeps gpt-oss's experts [E, in, out]
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
            assert torch.equal(ours.gate_up_proj_bias, theirs.gate_up_proj_bias[owned])
            assert torch.equal(ours.down_proj_bias, theirs.down_proj_bias[owned])
        assert torch.equal(ours.gate_up_proj, gate_up) and torch.equal(ours.down_proj, down)
        our_router = getattr(mlp, "gate", None) or mlp.router
        assert torch.equal(our_router.weight, router.weight)  # whole on every rank


def test_gpt_oss_sliced_experts_and_sinks(tmp_path):
    """Split by rows: rank r holds every expert's intermediate columns [r*I/N, (r+1)*I/N) (2*I/N consecutive
    columns of the interleaved gate/up), its query heads' sinks, and (rank 0 only) the down bias."""
    hf_model = build_tiny(tmp_path, "gpt_oss")
    theirs = hf_model.model.layers[0].mlp.experts
    inter = hf_model.config.intermediate_size // TP
    heads = hf_model.config.num_attention_heads // TP
    for rank in range(TP):
        layout = shard_layout(hf_model.config, rank, TP)
        model = load_rank_model(str(tmp_path), layout, load_format="auto", dtype=torch.float32,
                                device=torch.device("cpu"), seed=0)
        layer = model.model.layers[0]
        ours = layer.mlp.experts
        columns = slice(2 * rank * inter, 2 * (rank + 1) * inter)
        assert torch.equal(ours.gate_up_proj, theirs.gate_up_proj[:, :, columns].transpose(1, 2))
        assert torch.equal(ours.gate_up_proj_bias, theirs.gate_up_proj_bias[:, columns])
        assert torch.equal(ours.down_proj, theirs.down_proj[:, rank * inter:(rank + 1) * inter].transpose(1, 2))
        down_bias = theirs.down_proj_bias if rank == 0 else torch.zeros_like(theirs.down_proj_bias)
        assert torch.equal(ours.down_proj_bias, down_bias)
        sinks = hf_model.model.layers[0].self_attn.sinks
        assert torch.equal(layer.self_attn.sinks, sinks[rank * heads:(rank + 1) * heads])


def test_expert_parallel_needs_experts_n_divides():
    config = tiny_config("qwen2_moe", architectures=["Qwen2MoeForCausalLM"])  # 6 experts
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 must divide the model's experts \(6\) with "
                                         "enable_expert_parallel"):
        shard_layout(config, 0, 4, expert_parallel=True)
    shard_layout(config, 0, 4 // 2, expert_parallel=True)  # 3 whole experts a rank


def test_expert_parallel_on_a_dense_model_is_refused(tmp_path):
    build_tiny_model(tmp_path, "llama")
    with pytest.raises(InvalidArgument, match="enable_expert_parallel=True: LlamaForCausalLM has no experts") as info:
        LLM(model=str(tmp_path), skip_tokenizer_init=True, tensor_parallel_size=TP, enable_expert_parallel=True)
    assert info.value.param == "enable_expert_parallel"
