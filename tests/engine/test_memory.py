"""KV pool sizing: blocks from the memory given, the CPU default, or a GPU profile, against the bytes a block of
the transformers config's K/V takes."""
import dataclasses

import pytest
import torch

from serval import LLM
from serval.config import DEFAULT_CPU_KV_CACHE_BYTES
from serval.engine.memory import GPU_RESERVE_BYTES, GpuMemoryProfile, num_kv_blocks


@pytest.fixture(scope="module")
def engine(tiny_models):
    return LLM(model=tiny_models("llama")[0], skip_tokenizer_init=True, block_size=4, max_model_len=128,
               max_num_seqs=4).engine


def block_bytes(hf_config, block_size: int, itemsize: int) -> int:
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    return 2 * hf_config.num_hidden_layers * block_size * hf_config.num_key_value_heads * head_dim * itemsize


def test_blocks_from_the_memory_given_and_the_cpu_default(engine, tiny_models):
    hf_config = tiny_models("llama")[1].config
    config, model, cpu = engine.config, engine.model, torch.device("cpu")
    per_block = block_bytes(hf_config, config.block_size, engine.dtype.itemsize)
    given = dataclasses.replace(config, kv_cache_memory_bytes=100 * per_block + per_block // 2)
    assert num_kv_blocks(given, model, engine.dtype, cpu) == 100
    # A float8 block takes one byte per element: itemsize times the blocks in the same memory.
    assert num_kv_blocks(given, model, torch.float8_e4m3fn, cpu) == \
           given.kv_cache_memory_bytes // block_bytes(hf_config, config.block_size, 1)
    override = dataclasses.replace(config, num_gpu_blocks_override=77)
    assert num_kv_blocks(override, model, engine.dtype, cpu) == 77
    # The CPU default, capped at every sequence at full length (128 tokens: 32 blocks of 4).
    assert num_kv_blocks(config, model, engine.dtype, cpu) == min(DEFAULT_CPU_KV_CACHE_BYTES // per_block, 4 * 32)
    assert engine.kv_cache.num_blocks == num_kv_blocks(config, model, engine.dtype, cpu)


def test_a_pool_smaller_than_one_sequence_is_refused(engine):
    too_small = dataclasses.replace(engine.config, num_gpu_blocks_override=31)  # 128 tokens need 32 blocks of 4
    with pytest.raises(ValueError, match=r"31 blocks .* max_model_len=128 needs \(32\)"):
        num_kv_blocks(too_small, engine.model, engine.dtype, torch.device("cpu"))


def test_gpu_budget_leaves_weights_activations_and_a_reserve():
    gib = 1024**3
    profile = GpuMemoryProfile(total=80 * gib, free=70 * gib, weights=10 * gib, activations=2 * gib)
    assert profile.kv_cache_budget(0.9) == int(0.9 * 80 * gib - 10 * gib - 2 * gib - GPU_RESERVE_BYTES)
    # Another process holds most of the card: never more than is free now.
    crowded = dataclasses.replace(profile, free=20 * gib)
    assert crowded.kv_cache_budget(0.9) == 20 * gib - 2 * gib - GPU_RESERVE_BYTES
    assert dataclasses.replace(profile, free=gib).kv_cache_budget(0.9) == 0
