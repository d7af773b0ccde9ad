"""AttentionMetadata's derived fields and the Attention layer's rotate-write-attend contract, on both backends."""
from __future__ import annotations

import pytest
import torch
from tests.kernels.test_paged_attention import allocate_blocks, dense_attention, step_metadata

from serval.layers.attention import Attention, AttentionMetadata
from serval.layers.rotary import RotaryEmbedding, apply_rotary


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


def run_steps_on_backend(backend: str, monkeypatch, qkv: torch.Tensor, lens: list[int], splits: list[int],
                         kv_dtype: torch.dtype, sliding_window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two steps (a prefix of each request, then the rest) of a layer with rotary embedding on one backend, q/k/v
    being views of a merged projection as in a model: (every token's output in sequence order, the final cache)."""
    monkeypatch.setenv("SERVAL_ATTENTION_BACKEND", backend)
    num_heads, num_kv_heads, head_dim, block_size = 6, 2, 32, 4
    rotary = RotaryEmbedding(head_dim, 64, {"rope_type": "default", "rope_theta": 10000.0})
    layer = Attention(num_heads, num_kv_heads, head_dim, scale=head_dim ** -0.5, rotary_emb=rotary,
                      sliding_window=sliding_window)
    block_ids, num_blocks = allocate_blocks(lens, block_size)
    kv_cache = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=kv_dtype)
    starts = torch.tensor([0] + lens).cumsum(0).tolist()
    outputs = [[] for _ in lens]
    for spans in ([(0, s) for s in splits], list(zip(splits, lens))):
        active = [i for i, (a, b) in enumerate(spans) if b > a]
        positions, metadata = step_metadata([block_ids[i] for i in active], [spans[i] for i in active], block_size)
        step_qkv = torch.cat([qkv[starts[i] + a:starts[i] + b] for i in active for a, b in [spans[i]]])
        q, k, v = step_qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
        out = layer(positions, q.unflatten(-1, (-1, head_dim)), k.unflatten(-1, (-1, head_dim)),
                    v.unflatten(-1, (-1, head_dim)), kv_cache, metadata)
        for row, i in enumerate(active):
            outputs[i].append(out[metadata.query_start_loc[row]:metadata.query_start_loc[row + 1]])
    return torch.cat([chunk for chunks in outputs for chunk in chunks]), kv_cache


@pytest.mark.parametrize("dtype,kv_dtype,sliding_window", [(torch.float32, torch.float32, None),
                                                           (torch.float16, torch.float8_e4m3fn, 5)])
@pytest.mark.skipif(torch.cuda.is_available(), reason="builds CPU tensors for Triton's interpreter; on a GPU "
                    "tests/engine/test_cuda_graphs.py runs this path against the CPU engine")
def test_fused_rotary_and_kv_write_path_equals_the_reference_path(dtype, kv_dtype, sliding_window, monkeypatch):
    """What CUDA runs (one Triton kernel rotates q/k and writes K/V, then the Triton attention; here in the
    interpreter) against what CPU runs (rotary, write_kv, attention in torch): the same outputs and the same cache,
    and both the dense causal attention of the rotated sequence."""
    pytest.importorskip("triton")
    torch.manual_seed(7)
    lens, splits = [1, 7, 13], [0, 3, 12]  # step 2 has a decode row, a prefill chunk and a whole prompt
    qkv = torch.randn(sum(lens), (6 + 2 * 2) * 32, dtype=dtype)
    fused_out, fused_cache = run_steps_on_backend("triton", monkeypatch, qkv.clone(), lens, splits, kv_dtype,
                                                  sliding_window)
    reference_out, reference_cache = run_steps_on_backend("torch", monkeypatch, qkv.clone(), lens, splits, kv_dtype,
                                                          sliding_window)
    assert torch.equal(fused_cache.view(torch.uint8), reference_cache.view(torch.uint8))
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(fused_out, reference_out, **tolerance)

    if kv_dtype == dtype:  # unquantized: the reference path is plain RoPE + causal attention
        rotary = RotaryEmbedding(32, 64, {"rope_type": "default", "rope_theta": 10000.0})
        expected = []
        for sequence in qkv.split(lens):
            q, k, v = (t.unflatten(-1, (-1, 32)) for t in sequence.split([6 * 32, 2 * 32, 2 * 32], dim=-1))
            positions = torch.arange(len(sequence))
            cos, sin = rotary.cos_cache[positions], rotary.sin_cache[positions]
            expected.append(dense_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, 32 ** -0.5,
                                            sliding_window))
        torch.testing.assert_close(reference_out, torch.cat(expected), **tolerance)
