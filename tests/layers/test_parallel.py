"""The tensor-parallel layout: which heads each rank holds, and the sizes it refuses (before any process starts)."""
from __future__ import annotations

import pytest
import transformers

from serval.layers.parallel import checkpoint_slice, shard_layout


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
    config = transformers.Gemma3TextConfig(num_attention_heads=4, num_key_value_heads=2)
    config.architectures = ["Gemma3ForCausalLM"]
    with pytest.raises(ValueError, match="Gemma3ForCausalLM has no tensor-parallel implementation yet"):
        shard_layout(config, 0, 2)
