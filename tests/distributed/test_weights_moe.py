"""Sharded loading of mixture-of-experts checkpoints: each rank's experts are exactly its slice of every expert's
gate, up and down projections (per expert or stacked as transformers 5 saves them), the router is whole, and a
model whose expert size N doesn't divide is refused."""
from __future__ import annotations

import pytest
import torch

from serval.distributed.weights import load_rank_model
from serval.layers.parallel import ParallelSparseMoeBlock, shard_layout
from serval.layers.linear import Linear
from tests.model.tiny_models import build_tiny, tiny_config

TP = 2


@pytest.mark.parametrize("family, save_original_format", [
    ("mixtral", True), ("qwen3_moe", False), ("qwen2_moe", True), ("qwen2_moe", False),
], ids=["mixtral-per-expert", "qwen3_moe-stacked", "qwen2_moe-per-expert", "qwen2_moe-stacked"])
def test_each_rank_holds_its_slice_of_every_expert(tmp_path, family, save_original_format):
    hf_model = build_tiny(tmp_path, family, save_original_format=save_original_format)
    for rank in range(TP):
        layout = shard_layout(hf_model.config, rank, TP)
        model = load_rank_model(str(tmp_path), layout, load_format="auto", dtype=torch.float32,
                                device=torch.device("cpu"), seed=0)
        num_sparse = 0
        for ours, theirs in zip(model.model.layers, hf_model.model.layers):
            if not isinstance(ours.mlp, ParallelSparseMoeBlock):
                continue
            num_sparse += 1
            # transformers 5 keeps experts stacked in memory: gate_up_proj [E, 2I, H] (gate rows first), down [E, H, I]
            inter = theirs.mlp.experts.down_proj.shape[-1] // TP
            rows = slice(rank * inter, (rank + 1) * inter)
            gate, up = theirs.mlp.experts.gate_up_proj.chunk(2, dim=1)
            assert torch.equal(ours.mlp.experts.gate_up_proj, torch.cat([gate[:, rows], up[:, rows]], dim=1))
            assert torch.equal(ours.mlp.experts.down_proj, theirs.mlp.experts.down_proj[:, :, rows])
            assert torch.equal(ours.mlp.gate.weight, theirs.mlp.gate.weight)  # the router is replicated
            if family == "qwen2_moe":
                shared, hf_shared = ours.mlp.shared_expert, theirs.mlp.shared_expert
                rows = slice(rank * hf_shared.down_proj.in_features // TP,
                             (rank + 1) * hf_shared.down_proj.in_features // TP)
                assert torch.equal(shared.gate_up_proj.weight, torch.cat([hf_shared.gate_proj.weight[rows],
                                                                          hf_shared.up_proj.weight[rows]]))
                assert torch.equal(shared.down_proj.weight, hf_shared.down_proj.weight[:, rows])
                assert type(shared.down_proj) is Linear  # summed by the block's all-reduce, not its own
                assert torch.equal(ours.mlp.shared_expert_gate.weight, theirs.mlp.shared_expert_gate.weight)
        assert num_sparse > 0


def test_expert_size_not_divisible_is_refused():
    config = tiny_config("qwen3_moe", moe_intermediate_size=33)
    config.architectures = ["Qwen3MoeForCausalLM"]
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 must divide the model's moe_intermediate_size "
                                         r"\(33\)"):
        shard_layout(config, 0, TP)
