"""The Triton attention kernels against the torch reference (serval.kernels.paged_attention).

On a machine without CUDA they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), on small shapes;
on a GPU the same tests run the compiled kernels. Block tables are random and non-contiguous, outputs are
poisoned with NaN first so a row the kernel forgets to write fails, and every check draws fresh inputs. A few
cases use a float8 e4m3 cache (kv_cache_dtype="fp8"): the reference reads the same float8 cache.
"""
from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

from serval.kernels import paged_attention as reference  # noqa: E402
from serval.kernels import triton_attention  # noqa: E402
from serval.layers.attention import AttentionMetadata  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn


def random_step(rng: random.Random, spans: list[tuple[int, int]], num_kv_heads: int, head_dim: int,
                block_size: int, dtype: torch.dtype):
    """A cache holding every request's keys up to its span's end, in shuffled blocks, and the step's metadata."""
    needed = [-(-end // block_size) for _, end in spans]
    num_blocks = sum(needed) + 4
    order = list(range(num_blocks))
    rng.shuffle(order)
    tables, used = [], 0
    for n in needed:
        tables.append(order[used:used + n])
        used += n
    kv_cache = reference.to_cache_dtype(torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim,
                                                    device=DEVICE), dtype)
    slots, query_start_loc = [], [0]
    for table, (start, end) in zip(tables, spans):
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
        query_start_loc.append(query_start_loc[-1] + end - start)
    width = max(needed) + 2  # wider than any request needs: padding the kernel must not read
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)
    metadata = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
                                 query_start_loc=query_start_loc, seq_lens=[end for _, end in spans],
                                 block_tables=block_tables, block_size=block_size)
    return kv_cache, metadata


def run_both(query, kv_cache, metadata, scale, sliding_window, prefill=None):
    expected = reference.paged_attention(query.float(), kv_cache, metadata, scale, sliding_window)
    out = torch.full_like(query, float("nan"))
    triton_attention.paged_attention(query, kv_cache, metadata, scale, sliding_window, out=out, prefill=prefill)
    return out.float(), expected


@pytest.mark.parametrize("sliding_window", [None, 7])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,kv_dtype", [
    (4, 4, 16, torch.float32), (4, 2, 32, torch.float32), (6, 2, 16, torch.float32), (8, 1, 16, torch.float32),
    (4, 2, 32, FP8)])
def test_prefill_chunks_and_mixed_batches_match_reference(num_heads, num_kv_heads, head_dim, kv_dtype,
                                                          sliding_window):
    rng = random.Random(num_heads * 100 + num_kv_heads + (sliding_window or 0))
    for trial in range(2):
        # Whole prompts, later chunks after a cached prefix, and single-token (decode) rows in one batch.
        spans = [(0, rng.randint(2, 40)), (rng.randint(1, 30), 0), (rng.randint(5, 60), 0), (0, 1)]
        spans = [(start, end if end else start + rng.choice([1, rng.randint(2, 70)])) for start, end in spans]
        kv_cache, metadata = random_step(rng, spans, num_kv_heads, head_dim, block_size=4, dtype=kv_dtype)
        query = torch.randn(metadata.query_start_loc[-1], num_heads, head_dim, device=DEVICE)
        out, expected = run_both(query, kv_cache, metadata, head_dim ** -0.5, sliding_window)
        torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("num_heads,num_kv_heads,kv_dtype", [
    (4, 2, torch.float32), (8, 8, torch.float32), (6, 2, torch.float32), (4, 2, FP8)])
def test_decode_split_k_matches_reference(num_heads, num_kv_heads, kv_dtype):
    rng = random.Random(num_heads + 10 * num_kv_heads)
    head_dim = 32
    lens = [1, 2, 17, 130, 64, 5]  # from shorter than one split's tile to many tiles per split
    kv_cache, metadata = random_step(rng, [(n - 1, n) for n in lens], num_kv_heads, head_dim, block_size=16,
                                     dtype=kv_dtype)
    assert triton_attention.decode_num_splits(len(lens), num_kv_heads) > 1
    query = torch.randn(len(lens), num_heads, head_dim, device=DEVICE)
    out, expected = run_both(query, kv_cache, metadata, head_dim ** -0.5, None)
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)


def test_decode_padding_rows_are_zero():
    """A captured batch pads with rows of seq_len 0: they must read nothing and come out as zeros, not NaN."""
    rng = random.Random(5)
    kv_cache, metadata = random_step(rng, [(8, 9), (0, 1), (0, 1)], 2, 16, block_size=4, dtype=torch.float32)
    metadata.seq_lens_tensor[1:] = 0
    query = torch.randn(3, 4, 16, device=DEVICE)
    out = torch.full_like(query, float("nan"))
    triton_attention.paged_attention(query, kv_cache, metadata, 0.25, out=out)
    assert torch.equal(out[1:], torch.zeros_like(out[1:]))
    expected = reference.paged_attention(query[:1], kv_cache, AttentionMetadata(
        metadata.slot_mapping[:1], [0, 1], [9], metadata.block_tables[:1], 4), 0.25)
    torch.testing.assert_close(out[:1], expected, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    DEVICE == "cpu", reason="Triton's interpreter computes bfloat16 wrongly (NumPy has no bfloat16); GPU only"))])
def test_half_precision_close_to_float32_reference(dtype):
    rng = random.Random(7)
    kv_cache, metadata = random_step(rng, [(0, 33), (20, 21), (3, 40)], 2, 32, block_size=16, dtype=dtype)
    query = torch.randn(metadata.query_start_loc[-1], 8, 32, device=DEVICE, dtype=dtype)
    out, expected = run_both(query, kv_cache, metadata, 32 ** -0.5, None)
    relative = (out - expected).norm() / expected.norm()
    assert relative < 1e-2, relative


@pytest.mark.parametrize("kv_dtype", [torch.float32, FP8])
def test_write_kv_matches_reference_and_skips_negative_slots(kv_dtype):
    """Byte for byte, float8 included: magnitudes from e4m3's subnormals to past its 448 (which saturate)."""
    torch.manual_seed(3)
    magnitudes = torch.logspace(-4, 3, 16, device=DEVICE)
    key, value = torch.randn(6, 3, 16, device=DEVICE) * magnitudes, torch.randn(6, 3, 16, device=DEVICE) * magnitudes
    key[0, 0, -1], value[3, 1, -1] = 1000.0, -500.0
    slots = torch.tensor([9, 0, -1, 4, 15, -1], device=DEVICE)
    expected = reference.to_cache_dtype(torch.randn(2, 4, 4, 3, 16, device=DEVICE), kv_dtype)
    cache = expected.clone()
    keep = slots >= 0
    reference.write_kv(expected, key[keep], value[keep], slots[keep])
    triton_attention.write_kv(cache, key, value, slots)
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))
    assert not expected.float().isnan().any()


def test_float8_cache_close_to_unquantized_cache():
    """Half-precision queries over a float8 copy of a cache (tiles widened to the query's dtype, not float32):
    near the reference over that float8 cache, and within fp8's few percent of the reference over the
    unquantized one, so the kernel dequantizes, with scale 1.0."""
    rng = random.Random(11)
    dtype = torch.float16 if DEVICE == "cpu" else torch.bfloat16  # the interpreter has no bfloat16
    kv_cache, metadata = random_step(rng, [(0, 33), (20, 21), (3, 40)], 2, 32, block_size=16, dtype=torch.float32)
    query = torch.randn(metadata.query_start_loc[-1], 8, 32, device=DEVICE, dtype=dtype)
    out, on_fp8 = run_both(query, reference.to_cache_dtype(kv_cache, FP8), metadata, 32 ** -0.5, None)
    unquantized = reference.paged_attention(query.float(), kv_cache, metadata, 32 ** -0.5)
    assert (out - on_fp8).norm() / on_fp8.norm() < 1e-2
    assert 1e-3 < (out - unquantized).norm() / unquantized.norm() < 5e-2


@pytest.mark.parametrize("spans", [[(0, 33), (20, 21), (3, 40)], [(30, 31), (5, 6), (47, 48)]],
                         ids=["mixed", "decode"])
def test_float8_cache_half_products_match_reference(spans):
    """The float8 cache's products in float16 (what a bfloat16 query gets on a GPU; forced here, since the
    interpreter has no bfloat16): near the reference over the same float8 cache, in the flat and split-K
    launches, and a query past float16's range is clamped, not turned into inf or NaN."""
    rng = random.Random(13)
    kv_cache, metadata = random_step(rng, spans, 2, 32, block_size=16, dtype=FP8)
    query = torch.randn(metadata.query_start_loc[-1], 8, 32, device=DEVICE)
    expected = reference.paged_attention(query, kv_cache, metadata, 32 ** -0.5)
    out = torch.full_like(query, float("nan"))
    triton_attention.paged_attention(query, kv_cache, metadata, 32 ** -0.5, out=out, half_products=True)
    assert (out - expected).norm() / expected.norm() < 1e-2
    query[0, 0, 0] = 1e6
    triton_attention.paged_attention(query, kv_cache, metadata, 32 ** -0.5, out=out, half_products=True)
    assert out.isfinite().all()


@pytest.mark.parametrize("kv_dtype", [torch.float32, FP8])
def test_split_decodes_serve_each_request_once(kv_dtype):
    """A mixed step in two launches (prompt tiles in the flat grid, single-token requests in the decode grid):
    every request is answered (outputs start as NaN) and matches the reference."""
    rng = random.Random(17)
    spans = [(0, 33), (40, 41), (20, 21), (3, 40), (64, 65), (0, 1)]
    kv_cache, metadata = random_step(rng, spans, 2, 32, block_size=16, dtype=kv_dtype)
    query = torch.randn(metadata.query_start_loc[-1], 8, 32, device=DEVICE)
    expected = reference.paged_attention(query, kv_cache, metadata, 32 ** -0.5)
    out = torch.full_like(query, float("nan"))
    triton_attention.paged_attention(query, kv_cache, metadata, 32 ** -0.5, out=out, split_decodes=True)
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)


def test_float8_cache_takes_half_products_only_for_bfloat16_queries(monkeypatch):
    fp8_cache, bf16_cache = torch.zeros(2, 1, 1, 1, 8, dtype=FP8), torch.zeros(2, 1, 1, 1, 8, dtype=torch.bfloat16)
    bf16, fp16 = torch.zeros(1, 1, 8, dtype=torch.bfloat16), torch.zeros(1, 1, 8, dtype=torch.float16)
    assert triton_attention.fp8_half_products(fp8_cache, bf16)
    assert not triton_attention.fp8_half_products(fp8_cache, fp16)
    assert not triton_attention.fp8_half_products(bf16_cache, bf16)
    monkeypatch.setenv("SERVAL_FP8_ATTENTION_HALF", "0")
    assert not triton_attention.fp8_half_products(fp8_cache, bf16)


def test_write_kv_reads_strided_projections():
    """k and v arrive as column slices of the merged qkv projection, not contiguous tensors."""
    torch.manual_seed(4)
    qkv = torch.randn(5, (4 + 2 + 2) * 16, device=DEVICE)
    key = qkv[:, 64:96].view(5, 2, 16)
    value = qkv[:, 96:].view(5, 2, 16)
    slots = torch.tensor([3, 1, 7, 6, 0], device=DEVICE)
    expected = torch.zeros(2, 2, 4, 2, 16, device=DEVICE)
    cache = expected.clone()
    reference.write_kv(expected, key, value, slots)
    triton_attention.write_kv(cache, key, value, slots)
    assert torch.equal(cache, expected)


@pytest.mark.parametrize("sliding_window", [None, 6])
@pytest.mark.parametrize("num_heads,num_kv_heads,kv_dtype", [(4, 2, torch.float32), (8, 2, torch.float32),
                                                              (4, 2, FP8)])
def test_verify_shaped_batches_split_k_match_reference(num_heads, num_kv_heads, kv_dtype, sliding_window):
    """A speculative verify step (k drafts + 1 query tokens a request, here k = 4, and one request with fewer)
    runs one query tile per request split over its keys, as decode does: causal within the tile, each split's
    partial combined, a request shorter than the tile and contexts shorter than one split included."""
    rng = random.Random(num_heads + 10 * num_kv_heads + (sliding_window or 0))
    head_dim = 32
    contexts = [0, 3, 40, 130, 7]
    spans = [(c, c + 5) for c in contexts] + [(20, 22)]
    kv_cache, metadata = random_step(rng, spans, num_kv_heads, head_dim, block_size=16, dtype=kv_dtype)
    metadata.split_queries = True
    block_q, num_splits, flat = triton_attention.launch_shape(metadata.max_query_len, len(spans), num_kv_heads,
                                                              num_heads // num_kv_heads, split_queries=True)
    assert (metadata.max_query_len, flat, block_q) == (5, False, 8) and num_splits > 1
    query = torch.randn(metadata.query_start_loc[-1], num_heads, head_dim, device=DEVICE)
    out, expected = run_both(query, kv_cache, metadata, head_dim ** -0.5, sliding_window)
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)


def test_launch_shape_bounds_the_split_path():
    """Only a batch that asks (a verify graph) and fits, or decode, splits; past _SMALL_QUERY_TOKENS query tokens or
    a prefill tile's rows the flat prefill grid runs."""
    decode_block_q, decode_splits, decode_flat = triton_attention.launch_shape(1, 3, 8, 4)
    assert (decode_block_q, decode_flat) == (4, False) and decode_splits > 1
    block_q, num_splits, flat = triton_attention.launch_shape(8, 3, 8, 4, split_queries=True)
    assert (block_q, num_splits, flat) == (8, decode_splits, False)
    assert triton_attention.launch_shape(8, 3, 8, 4) == (16, 1, True)  # not asked: no new kernel mid-serving
    assert triton_attention.launch_shape(9, 3, 8, 4, split_queries=True) == (16, 1, True)
    assert triton_attention.launch_shape(8, 3, 8, 16, split_queries=True)[2] is True  # 8 x 16 rows: past a tile
    assert triton_attention.launch_shape(0, 3, 8, 4)[2] is True


@pytest.mark.parametrize("config", [triton_attention.PrefillConfig(128, 32, 8, 3),
                                    triton_attention.PrefillConfig(16, 128, 4, 1),
                                    triton_attention.PrefillConfig(16, 16, 4, 2, split_causal=1),
                                    triton_attention.PrefillConfig(32, 16, 4, 2, split_causal=1)])
def test_prefill_configs_from_a_device_table_match_reference(config):
    """The flat launch with another row count and key tile, and with the causal split (whole tiles before a
    program's first query unmasked; what a device's table may pick; the interpreter ignores warps and stages):
    prompts, chunks after a cached prefix and decode rows in one batch, the split's tiles both sides of the
    diagonal."""
    rng = random.Random(config.rows)
    for num_heads, num_kv_heads in ((4, 2), (8, 2)):
        spans = [(0, 37), (21, 50), (40, 41), (0, 3)]
        kv_cache, metadata = random_step(rng, spans, num_kv_heads, 16, block_size=4, dtype=torch.float32)
        query = torch.randn(metadata.query_start_loc[-1], num_heads, 16, device=DEVICE)
        out, expected = run_both(query, kv_cache, metadata, 16 ** -0.5, None, prefill=config)
        torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)


def test_prefill_config_table_lookup():
    table = {"prefill": {"D=128,G=4": [128, 64, 8, 3], "default": [64, 32, 4, 2], "D=64,G=32": [16, 64, 4, 2],
                         "D=256,G=1": [64, 64, 4, 2, 1]}}
    pick = triton_attention.pick_prefill_config
    assert pick(table, 128, 4) == triton_attention.PrefillConfig(128, 64, 8, 3)
    assert pick(table, 64, 8) == triton_attention.PrefillConfig(64, 32, 4, 2)  # no entry: the table's default
    assert pick(table, 64, 32) == triton_attention.PrefillConfig(64, 32, 4, 2)  # 16 rows can't hold 32 heads
    assert pick(table, 256, 1).split_causal == 1 and pick(table, 128, 4).split_causal == 0  # 4 values: off
    assert pick(None, 128, 4) == pick({}, 128, 4) == triton_attention.PREFILL_CONFIG
    assert triton_attention.prefill_config(torch.device("cpu"), 128, 4) == triton_attention.PREFILL_CONFIG
