"""Sharded loading: each rank's parameters are exactly its slice of the checkpoint (read with get_slice), for
split K/V heads and for K/V heads replicated over more ranks than there are, and a vocabulary N doesn't divide;
for Gemma 3 (per-head norms replicated) and Phi-3 (fused qkv_proj and gate_up_proj, each part sliced)."""
from __future__ import annotations

import pytest
import torch

from serval.distributed.weights import load_rank_model
from serval.layers.parallel import shard_layout
from tests.conftest import build_tiny_model
from tests.model.tiny_models import build_tiny

TP = 2


def expected_slices(hf_state: dict[str, torch.Tensor], layout) -> dict[str, torch.Tensor]:
    """Our parameter names -> the rank's slice of the full HF tensors, cut here by hand from the layout."""
    heads, head_dim = layout.num_heads // TP, layout.head_dim
    kv_heads = max(layout.num_kv_heads // TP, 1)
    kv_first = layout.rank * layout.num_kv_heads // TP if layout.num_kv_heads < TP else layout.rank * kv_heads
    inter = layout.intermediate_size // TP
    vocab = -(-layout.vocab_size // TP)
    rank = layout.rank
    out = {}
    for name, full in hf_state.items():
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            out[name] = full[rank * heads * head_dim:(rank + 1) * heads * head_dim]
        elif name.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
            out[name] = full[kv_first * head_dim:(kv_first + kv_heads) * head_dim]
        elif name.endswith("o_proj.weight"):
            out[name] = full[:, rank * heads * head_dim:(rank + 1) * heads * head_dim]
        elif name.endswith(("gate_proj.weight", "up_proj.weight")):
            out[name] = full[rank * inter:(rank + 1) * inter]
        elif name.endswith("down_proj.weight"):
            out[name] = full[:, rank * inter:(rank + 1) * inter]
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            rows = full[rank * vocab:(rank + 1) * vocab]
            out[name] = torch.cat([rows, rows.new_zeros(vocab - len(rows), rows.shape[1])])  # the last is padded
        else:
            out[name] = full
    return out


def ours(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our parameters under the checkpoint's names (the merged q/k/v and gate/up split back)."""
    named = {}
    for name, param in model.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        shards = getattr(module, "shard_names", ())  # a merged Linear's; FusedMoE's stacks keep their names
        if isinstance(shards, (list, tuple)) and shards:
            for shard in shards:
                named[f"{module_name.rpartition('.')[0]}.{shard}_proj.{leaf}"] = module.shard(param, shard)
        else:
            named[name] = param
    return named


def unfused(hf_state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Phi-3's fused checkpoint tensors cut by hand into the Llama names: [q; k; v] and [gate; up] rows."""
    head_dim = config.hidden_size // config.num_attention_heads
    q_rows, kv_rows = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    out = {}
    for name, full in hf_state.items():
        if ".qkv_proj." in name:
            q, k, v = full.split([q_rows, kv_rows, kv_rows])
            out |= {name.replace("qkv_proj", "q_proj"): q, name.replace("qkv_proj", "k_proj"): k,
                    name.replace("qkv_proj", "v_proj"): v}
        elif ".gate_up_proj." in name:
            gate, up = full.chunk(2)
            out |= {name.replace("gate_up_proj", "gate_proj"): gate, name.replace("gate_up_proj", "up_proj"): up}
        else:
            out[name] = full
    return out


@pytest.mark.parametrize("arch, overrides", [
    ("qwen2", {}),  # q/k/v biases, tied embeddings
    ("llama", dict(num_key_value_heads=1, vocab_size=321)),  # one K/V head replicated; 321 = 161 + 160 (+1 pad)
    ("gemma3", {}),  # per-head q/k norms, four norms per layer, tied embeddings
    ("phi3", dict(num_key_value_heads=1, vocab_size=321)),  # fused projections; a replicated K/V head's rows
], ids=["qwen2-split-kv", "llama-replicated-kv-odd-vocab", "gemma3", "phi3-fused-replicated-kv-odd-vocab"])
def test_each_rank_holds_its_slice(tmp_path, arch, overrides):
    if arch in ("gemma3", "phi3"):
        hf_model = build_tiny(tmp_path, arch, **overrides)
    else:
        hf_model = build_tiny_model(tmp_path, arch, **overrides)
    hf_state = unfused(hf_model.state_dict(), hf_model.config)
    for rank in range(TP):
        layout = shard_layout(hf_model.config, rank, TP)
        model = load_rank_model(str(tmp_path), layout, load_format="auto", dtype=torch.float32,
                                device=torch.device("cpu"), seed=0)
        got = ours(model)
        if model.tie_word_embeddings:
            got["lm_head.weight"] = got["model.embed_tokens.weight"]
        want = expected_slices(hf_state, layout)
        assert sorted(got) == sorted(want)
        for name in want:
            assert torch.equal(got[name], want[name]), f"rank {rank}: {name}"
        assert model.num_kv_heads == max(hf_model.config.num_key_value_heads // TP, 1)
        assert model.vocab_size == hf_model.config.vocab_size
