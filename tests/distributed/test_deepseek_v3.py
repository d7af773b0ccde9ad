"""DeepSeek-V3 under tensor parallelism (CPU, gloo): multi-head latent attention split by heads (q_b_proj or q_proj
and kv_b_proj column-parallel, o_proj row-parallel; the latent projections, their norms and the latent cache whole
on every rank), the routed experts split by rows or, with expert parallelism, whole among the ranks, the shared
experts split by rows, the first dense layers as Llama's MLP. Greedy tokens equal transformers' and
tensor_parallel_size=1's; each rank holds exactly its slice of the checkpoint."""
from __future__ import annotations

import pytest
import torch

from serval.distributed.weights import load_rank_model
from serval.layers.parallel import shard_layout
from tests.distributed.test_tensor_parallel import greedy_checked_tp_llm
from tests.distributed.test_weights import ours
from tests.model.tiny_models import build_tiny

TP = 2


@pytest.mark.parametrize("q_lora_rank, engine_args", [(48, {}), (None, dict(enable_expert_parallel=True))],
                         ids=["q-lora-experts-split", "q-proj-expert-parallel"])
def test_greedy_matches_transformers_and_tp1(tmp_path, q_lora_rank, engine_args):
    hf_model = build_tiny(tmp_path, "deepseek_v3", q_lora_rank=q_lora_rank)
    with greedy_checked_tp_llm(str(tmp_path), hf_model, **engine_args) as llm:
        attention = llm.engine.model.model.layers[0].self_attn
        assert attention.dims.num_heads == hf_model.config.num_attention_heads // TP
        # The latent cache is per token: every rank keeps the whole latent of every token for its heads.
        assert llm.engine.runner.kv_caches[0].shape[-1] == hf_model.config.kv_lora_rank + \
            hf_model.config.qk_rope_head_dim


def expected_slices(hf_state: dict[str, torch.Tensor], config, rank: int) -> dict[str, torch.Tensor]:
    """Our parameter names -> the rank's slice of the full HF tensors, cut here by hand."""
    heads = config.num_attention_heads // TP
    q_width = config.qk_nope_head_dim + config.qk_rope_head_dim
    kv_width = config.qk_nope_head_dim + config.v_head_dim
    dense, expert = config.intermediate_size // TP, config.moe_intermediate_size // TP
    shared = config.moe_intermediate_size * config.n_shared_experts // TP
    vocab = config.vocab_size // TP

    def rows(tensor, width, dim=0):
        return tensor.narrow(dim, rank * width, width)

    out = {}
    for name, full in hf_state.items():
        if name.endswith(("q_b_proj.weight", "self_attn.q_proj.weight")):
            out[name] = rows(full, heads * q_width)
        elif name.endswith("kv_b_proj.weight"):
            out[name] = rows(full, heads * kv_width)
        elif name.endswith("o_proj.weight"):
            out[name] = rows(full, heads * config.v_head_dim, dim=1)
        elif ".shared_experts." in name:
            out[name] = rows(full, shared, dim=1 if "down_proj" in name else 0)
        elif name.endswith("experts.gate_up_proj"):  # [E, 2I, H]: this rank's gate rows, then its up rows
            gate, up = full.chunk(2, dim=1)
            out[name] = torch.cat([rows(gate, expert, 1), rows(up, expert, 1)], dim=1)
        elif name.endswith("experts.down_proj"):
            out[name] = rows(full, expert, dim=2)
        elif name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
            out[name] = rows(full, dense)
        elif name.endswith("mlp.down_proj.weight"):
            out[name] = rows(full, dense, dim=1)
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            out[name] = rows(full, vocab)
        else:  # q_a_proj, kv_a_proj_with_mqa, their norms, the routers, the layer norms: whole
            out[name] = full
    return out


def test_each_rank_holds_its_slice(tmp_path):
    hf_model = build_tiny(tmp_path, "deepseek_v3", save_original_format=False)
    hf_state = hf_model.state_dict()
    for rank in range(TP):
        layout = shard_layout(hf_model.config, rank, TP)
        model = load_rank_model(str(tmp_path), layout, load_format="auto", dtype=torch.float32,
                                device=torch.device("cpu"), seed=0)
        got = ours(model)
        want = expected_slices(hf_state, hf_model.config, rank)
        assert sorted(got) == sorted(want)
        for name in want:
            assert torch.equal(got[name], want[name]), f"rank {rank}: {name}"
