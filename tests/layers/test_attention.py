"""AttentionMetadata's derived fields and the Attention layer's write-then-attend contract."""
from __future__ import annotations

import pytest
import torch
from tests.kernels.test_paged_attention import allocate_blocks, dense_attention, step_metadata

from serval.layers.attention import Attention, AttentionMetadata


def test_metadata_derives_lengths():
    metadata = AttentionMetadata(slot_mapping=torch.tensor([0, 1, 2, 9]), query_start_loc=[0, 3, 4],
                                 seq_lens=[3, 10], block_tables=torch.tensor([[0, 0, 0], [1, 2, 3]], dtype=torch.int32),
                                 block_size=4)
    assert (metadata.max_query_len, metadata.max_seq_len, metadata.num_requests) == (3, 10, 2)
    assert metadata.seq_lens_tensor.tolist() == [3, 10]


def test_metadata_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="query_start_loc has 2 entries for 2 requests"):
        AttentionMetadata(slot_mapping=torch.tensor([0]), query_start_loc=[0, 1], seq_lens=[1, 1],
                          block_tables=torch.zeros(2, 1, dtype=torch.int32), block_size=4)


def test_layer_writes_cache_then_attends_over_it():
    torch.manual_seed(0)
    layer = Attention(num_heads=4, num_kv_heads=2, head_dim=8, scale=0.3, sliding_window=3)
    q, k, v = torch.randn(6, 4, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    block_ids, num_blocks = allocate_blocks([6], 2)
    kv_cache = torch.zeros(2, num_blocks, 2, 2, 8)
    _, first = step_metadata(block_ids, [(0, 4)], 2)
    _, second = step_metadata(block_ids, [(4, 6)], 2)
    positions = torch.arange(6)  # unused: the layer has no rotary embedding
    out = torch.cat([layer(positions[:4], q[:4], k[:4], v[:4], kv_cache, first),
                     layer(positions[4:], q[4:], k[4:], v[4:], kv_cache, second)])
    torch.testing.assert_close(out, dense_attention(q, k, v, 0.3, sliding_window=3), atol=1e-5, rtol=1e-5)
    slot = block_ids[0][5 // 2] * 2 + 1  # position 5's K landed at its slot
    torch.testing.assert_close(kv_cache[0].view(-1, 2, 8)[slot], k[5])


def test_heads_must_group_evenly():
    with pytest.raises(ValueError, match="num_attention_heads \\(6\\).*num_key_value_heads \\(4\\)"):
        Attention(num_heads=6, num_kv_heads=4, head_dim=8, scale=1.0)
