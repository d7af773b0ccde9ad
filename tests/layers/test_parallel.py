"""The tensor-parallel layout: which heads each rank holds, and the sizes it refuses (before any process starts)."""
from __future__ import annotations

import pytest
import transformers

from serval.layers.parallel import checkpoint_slice, fused_checkpoint_parts, shard_layout


def llama_config(**overrides) -> transformers.LlamaConfig:
    config = transformers.LlamaConfig(**{**dict(hidden_size=256, intermediate_size=512, num_attention_heads=16,
                                                num_key_value_heads=4, vocab_size=1000), **overrides})
    config.architectures = ["LlamaForCausalLM"]
    return config


def test_kv_heads_are_split_while_there_are_enough_and_replicated_to_the_query_heads_readers_after():
    config = llama_config()  # 16 query heads in 4 groups of 4, head_dim 16
    split = [checkpoint_slice("model.layers.0.self_attn.k_proj.weight", shard_layout(config, rank, 2))
             for rank in range(2)]
    assert [(s.start, s.length) for s in split] == [(0, 32), (32, 32)]  # two K/V heads each
    replicated = [checkpoint_slice("model.layers.0.self_attn.v_proj.weight", shard_layout(config, rank, 8))
                  for rank in range(8)]
    # rank r holds query heads 2r, 2r+1, which read K/V head r // 2
    assert [s.start // 16 for s in replicated] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert checkpoint_slice("model.layers.0.self_attn.o_proj.bias", shard_layout(config, 1, 2)) is None
    head = checkpoint_slice("lm_head.weight", shard_layout(llama_config(vocab_size=1001), 1, 2))
    assert (head.start, head.length, head.padded_length) == (501, 500, 501)


@pytest.mark.parametrize("overrides, size, message", [
    (dict(), 3, r"must divide the model's attention heads \(num_attention_heads=16\)"),
    (dict(num_key_value_heads=6, num_attention_heads=12, hidden_size=192), 4, r"key/value heads"),
    (dict(intermediate_size=510), 4, r"intermediate_size \(510\)"),
])
def test_sizes_that_do_not_split_are_refused(overrides, size, message):
    with pytest.raises(ValueError, match=message):
        shard_layout(llama_config(**overrides), 0, size)


def test_an_architecture_without_a_parallel_implementation_is_named():
    # Every causal family now shards; a sequence classifier (the pooling runner) has no sharded layout.
    config = transformers.Qwen3Config(num_attention_heads=4, num_key_value_heads=4)
    config.architectures = ["Qwen3ForSequenceClassification"]
    with pytest.raises(ValueError, match="Qwen3ForSequenceClassification has no tensor-parallel implementation yet"):
        shard_layout(config, 0, 2)


def test_fused_checkpoint_projections_are_read_as_each_parts_slice():
    """Phi-3's qkv_proj rows are [q (16 heads) | k (4) | v (4)] x head_dim 16, gate_up_proj's [gate 512 | up 512]:
    each rank reads its heads' rows of each part (replicated K/V heads at TP 8), its intermediate slice of each."""
    config = llama_config()
    config.architectures = ["Phi3ForCausalLM"]
    assert fused_checkpoint_parts("model.layers.0.self_attn.o_proj.weight", shard_layout(config, 0, 2)) is None
    qkv = fused_checkpoint_parts("model.layers.0.self_attn.qkv_proj.weight", shard_layout(config, 1, 2))
    assert [(p.hf_name.split(".")[-2], p.piece.start, p.piece.length) for p in qkv] == [
        ("q_proj", 128, 128), ("k_proj", 256 + 32, 32), ("v_proj", 256 + 64 + 32, 32)]
    replicated = fused_checkpoint_parts("model.layers.0.self_attn.qkv_proj.weight", shard_layout(config, 5, 8))
    assert [(p.piece.start, p.piece.length) for p in replicated] == [(160, 32), (256 + 32, 16), (256 + 64 + 32, 16)]
    gate_up = fused_checkpoint_parts("model.layers.0.mlp.gate_up_proj.weight", shard_layout(config, 1, 4))
    assert [(p.hf_name, p.piece.start, p.piece.length) for p in gate_up] == [
        ("model.layers.0.mlp.gate_proj.weight", 128, 128), ("model.layers.0.mlp.up_proj.weight", 512 + 128, 128)]
