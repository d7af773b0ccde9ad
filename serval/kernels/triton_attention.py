"""Triton kernels for attention over the paged KV cache: what CUDA runs; serval.kernels.paged_attention is their
reference (same arguments, same layout) and what CPU runs.

One attention kernel serves prefill chunks, prefix-cache hits and decode. A program owns one KV head of one
request and a tile of its query tokens, and packs the tile's tokens x the KV head's group of query heads into
the rows of its matrix: K/V are read once per KV head, not once per query head (grouped-query attention), and a
decode step (one token) still fills the 16 rows tensor cores want when the group is small. It walks the
request's keys through the block table TILE_N at a time with an online softmax (Milakov & Gimelshein, 2018;
FlashAttention, Dao et al., 2022), in the exp2 domain.

Decode uses split-K (flash-decoding): a request's keys are cut into NUM_SPLITS ranges handled by separate programs,
whose partial outputs and log-sum-exps are combined afterwards, so that a batch of a few long sequences still
occupies every multiprocessor. Every size the kernel needs comes from the device tensors (sequence lengths, query
start offsets), never from the host, so a decode step can be captured in a CUDA graph and replayed for any lengths.
A prefill or mixed batch launches its query tiles as one flat range sized by the batch's shape alone (flat_tiles);
each program finds its request by a binary search of query_start_loc on the device, so mixed steps padded to a
token bucket are captured too (serval.engine.mixed_graphs).

Attention sinks (gpt-oss) are one more logit per head with no value: the first split of each row starts its online
softmax from the sink (running max = sink, running sum = 1) instead of from nothing, and the combine of the splits
then counts it once.

A float8 e4m3 cache (kv_cache_dtype="fp8") is written through to_cache_dtype and each K/V tile is converted to the
query's dtype as it is loaded, before the dot products: half the bytes read, the same math; a bfloat16 query's
products then run in float16 (fp8_half_products), which float8 widens to in a single instruction. With per-layer
scales (k_scale, v_scale: serval.layers.quant.kv_scales) the cache holds k / k_scale and v / v_scale; the kernel
reads the two scales from device memory (graph-safe) and folds them into the softmax scale and the output.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from serval.kernels import pdl
from serval.kernels.triton_gemv import CONFIG_DIR, load_table
from serval.kernels.triton_quant import round_to_e4m3

if TYPE_CHECKING:
    from serval.layers.attention import AttentionMetadata

_LOG2E = 1.4426950408889634
# Rows per program: decode packs >= 16 (a tensor-core tile); prefill tiles are larger to reuse each K/V load.
_DECODE_ROWS = 16
_PREFILL_ROWS = 64
_TILE_N = 64
_MAX_SPLITS = 32
# Programs wanted in flight for decode: about twice an H100's 132 multiprocessors.
_TARGET_PROGRAMS = 264
# Query tokens a request may have and still run as decode does, one tile split over its keys, where the batch asks
# (AttentionMetadata.split_queries; launch_shape).
_SMALL_QUERY_TOKENS = 8


@dataclass(frozen=True)
class PrefillConfig:
    """The flat launch of prefill and mixed batches: `rows` of a program's matrix (query tokens x the KV head's
    group of query heads, padded to a power of two), `tile_n` keys a loop step, Triton's num_warps and num_stages
    (the key loop's software pipelining). A table per GPU (configs/attention,device=<GPU>.json, written by
    benchmarks/attention_tune.py) picks them by head size and padded group; decode and verify keep their own.
    split_causal: the key loop in two, whole tiles before the program's first query without the masks, then the
    rest with them (not with a sliding window)."""
    rows: int = _PREFILL_ROWS
    tile_n: int = _TILE_N
    num_warps: int = 4
    num_stages: int = 2
    split_causal: int = 0

    def as_list(self) -> list[int]:
        return [self.rows, self.tile_n, self.num_warps, self.num_stages, self.split_causal]


PREFILL_CONFIG = PrefillConfig()


def attention_config_file_name(device_name: str) -> str:
    return f"attention,device={device_name.replace(' ', '_')}.json"


def prefill_shape_key(head_dim: int, group_pad: int) -> str:
    return f"D={head_dim},G={group_pad}"


def pick_prefill_config(table: dict | None, head_dim: int, group_pad: int) -> PrefillConfig:
    """The table's entry for this head size and padded group, else its default, else PREFILL_CONFIG. An entry whose
    rows don't hold one query token's heads (rows < group_pad) or a tensor-core tile (16) is not used."""
    return _pick_config(table, "prefill", head_dim, group_pad, lambda config: config.rows >= max(16, group_pad))


def pick_decode_config(table: dict | None, head_dim: int, group_pad: int) -> PrefillConfig:
    """The decode launch's tile_n, num_warps and num_stages from the table's "decode" section (its rows entry is
    unused: a decode tile packs _DECODE_ROWS query heads), else PREFILL_CONFIG's."""
    return _pick_config(table, "decode", head_dim, group_pad, lambda config: True)


def _pick_config(table: dict | None, section_name: str, head_dim: int, group_pad: int, usable) -> PrefillConfig:
    section = (table or {}).get(section_name) or {}
    for key in (prefill_shape_key(head_dim, group_pad), "default"):
        values = section.get(key)
        if values is not None and usable(config := PrefillConfig(*(int(v) for v in values))):
            return config
    return PREFILL_CONFIG


def decode_config(device: torch.device, head_dim: int, group_pad: int) -> PrefillConfig:
    """This GPU's decode launch (PREFILL_CONFIG's without a table, and on the CPU's interpreter)."""
    return _launch_config(device, "decode", head_dim, group_pad)


def prefill_config(device: torch.device, head_dim: int, group_pad: int) -> PrefillConfig:
    """This GPU's flat-launch configuration (PREFILL_CONFIG without a table, and on the CPU's interpreter)."""
    return _launch_config(device, "prefill", head_dim, group_pad)


def _launch_config(device: torch.device, section_name: str, head_dim: int, group_pad: int) -> PrefillConfig:
    if device.type != "cuda":
        return PREFILL_CONFIG
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_config(index, section_name, head_dim, group_pad)


@functools.cache
def _device_config(device_index: int, section_name: str, head_dim: int, group_pad: int) -> PrefillConfig:
    """Looked up once per GPU, launch and shape: every attention layer of every step asks."""
    pick = pick_decode_config if section_name == "decode" else pick_prefill_config
    return pick(_device_table(device_index), head_dim, group_pad)


@functools.cache
def _device_table(device_index: int) -> dict | None:
    return load_table(os.path.join(CONFIG_DIR, attention_config_file_name(torch.cuda.get_device_name(device_index))))


@triton.jit
def to_cache_dtype(x, cache_ptr):
    """x in the cache's element type; paged_attention.to_cache_dtype is the reference (float8 e4m3, scale 1.0:
    saturated at +-448, since e4m3 has no infinity and an unclamped cast gives NaN)."""
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        x = round_to_e4m3(x)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def store_kv(key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot, stride_key_head, stride_value_head,
             NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
             HEAD_DIM_PAD: tl.constexpr):
    """One token's key and value [KVH, D] (key_ptr, value_ptr: its rows) into cache slot `slot`."""
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HEAD_DIM_PAD)[None, :]
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
    cache_offset = slot * NUM_KV_HEADS * HEAD_DIM + heads * HEAD_DIM + dims
    key = tl.load(key_ptr + heads * stride_key_head + dims, mask=mask)
    tl.store(key_cache_ptr + cache_offset, to_cache_dtype(key, key_cache_ptr), mask=mask)
    value = tl.load(value_ptr + heads * stride_value_head + dims, mask=mask)
    tl.store(value_cache_ptr + cache_offset, to_cache_dtype(value, value_cache_ptr), mask=mask)


@triton.jit
def _write_kv_kernel(key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
                     stride_key_token, stride_key_head, stride_value_token, stride_value_head,
                     NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                     HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:  # slot < 0: a padding row of a captured batch
        store_kv(key_ptr + token * stride_key_token, value_ptr + token * stride_value_token, key_cache_ptr,
                 value_cache_ptr, slot, stride_key_head, stride_value_head, NUM_KV_HEADS, HEADS_PAD, HEAD_DIM,
                 HEAD_DIM_PAD)


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
             k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """Store key/value [T, KVH, D] at their slots (slot < 0: skipped); kv_cache [2, blocks, block_size, KVH, D].
    k_scale / v_scale: store key / k_scale and value / v_scale."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if k_scale is not None:
        # Divided in float32 before the kernel rounds to float8, as the reference does. Two small launches; moving
        # the division into store_kv (and the fused rotary kernel) would save them.
        key, value = key.float() / k_scale, value.float() / v_scale
    assert key.stride(-1) == 1 and value.stride(-1) == 1 and kv_cache.is_contiguous()
    _write_kv_kernel[(num_tokens,)](
        key, value, kv_cache[0], kv_cache[1], slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim))


@triton.jit
def _tile_start(query_start_loc_ptr, seq, BLOCK_Q: tl.constexpr):
    return tl.load(query_start_loc_ptr + seq) // BLOCK_Q + seq


@triton.jit
def _tile_owner(query_start_loc_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The request whose tiles include flat tile `tile` (see flat_tiles): the last request i whose first tile,
    _tile_start(i) = query_start_loc[i] // BLOCK_Q + i, is at or before it, by binary search over the device's
    query_start_loc. _tile_start is strictly increasing, so every request, even one with no query, owns a tile."""
    low = tl.full([], 0, tl.int32)
    high = tl.full([], 0, tl.int32) + num_seqs
    while high - low > 1:
        middle = (low + high) // 2
        before = _tile_start(query_start_loc_ptr, middle, BLOCK_Q) <= tile
        low = tl.where(before, middle, low)
        high = tl.where(before, high, middle)
    return low


@triton.jit
def _attend_tile(query, key_cache_ptr, value_cache_ptr, block_tables_ptr, seq, stride_block_table, start, split_end,
                 query_pos, sliding_window, kv_offset, dim_valid, scale_log2, m_i, l_i, acc,
                 NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
                 USE_WINDOW: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over the TILE_N keys from `start`. MASKED: keys past split_end, after a row's query
    (causal) or outside its window are left out; unmasked, every key is visible to every row."""
    key_pos = start + tl.arange(0, TILE_N)
    if MASKED:
        key_valid = key_pos < split_end
        block = tl.load(block_tables_ptr + seq * stride_block_table + key_pos // BLOCK_SIZE, mask=key_valid, other=0)
        kv_mask = key_valid[:, None] & dim_valid[None, :]
    else:
        block = tl.load(block_tables_ptr + seq * stride_block_table + key_pos // BLOCK_SIZE)
        kv_mask = dim_valid[None, :]
    slot = block.to(tl.int64) * BLOCK_SIZE + key_pos % BLOCK_SIZE
    cache_offset = slot * (NUM_KV_HEADS * HEAD_DIM)
    # A float8 cache's tile is widened here (exactly): tl.dot wants both operands in one type.
    key = tl.load(key_cache_ptr + cache_offset[:, None] + kv_offset[None, :], mask=kv_mask,
                  other=0.0).to(query.dtype)
    scores = tl.dot(query, tl.trans(key), input_precision=DOT_PRECISION) * scale_log2
    if MASKED:
        visible = key_valid[None, :] & (key_pos[None, :] <= query_pos[:, None])
        if USE_WINDOW:
            visible = visible & (key_pos[None, :] > query_pos[:, None] - sliding_window)
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
    alpha = tl.exp2(m_i - m_safe)
    probs = tl.exp2(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(probs, 1)
    value = tl.load(value_cache_ptr + cache_offset[:, None] + kv_offset[None, :], mask=kv_mask,
                    other=0.0).to(query.dtype)
    acc = acc * alpha[:, None] + tl.dot(probs.to(value.dtype), value, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# Triton compiles a variant per "divisible by 16" / "equals 1" pattern of its integer arguments. The batch's request
# count and block-table width change from step to step, so specializing on them compiled new variants in the middle
# of serving (a first prefill whose counts both divide by 16 stalled every request for a compile); neither feeds an
# address the compiler could vectorize (a binary search bound; one int32 block-id load per block).
@triton.jit(do_not_specialize=["num_seqs", "stride_block_table"])
def _attention_kernel(query_ptr, key_cache_ptr, value_cache_ptr, out_ptr, partial_out_ptr, partial_lse_ptr,
                      block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, sinks_ptr, scale_log2, sliding_window,
                      k_scale_ptr, v_scale_ptr, num_seqs,
                      stride_query_token, stride_query_head, stride_out_token, stride_out_head, stride_block_table,
                      NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                      BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                      BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                      USE_WINDOW: tl.constexpr, USE_SINKS: tl.constexpr, HAS_KV_SCALE: tl.constexpr,
                      FLAT_TILES: tl.constexpr, SPLIT_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      HALF_PRODUCTS: tl.constexpr, QUERY_FILTER: tl.constexpr, USE_PDL: tl.constexpr):
    pdl.wait(USE_PDL)
    if HAS_KV_SCALE:  # q . (k_scale * k) = k_scale * (q . k): the key scale joins the softmax scale
        scale_log2 = scale_log2 * tl.load(k_scale_ptr)
    if FLAT_TILES:
        seq = _tile_owner(query_start_loc_ptr, tl.program_id(0), num_seqs, BLOCK_Q)
        query_tile = tl.program_id(0) - _tile_start(query_start_loc_ptr, seq, BLOCK_Q)
    else:
        query_tile = tl.program_id(0)
        seq = tl.program_id(1)
    kv_head = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS

    query_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_start
    if query_tile * BLOCK_Q >= query_len:
        return
    if QUERY_FILTER == 1:
        if query_len != 1:
            return
    if QUERY_FILTER == 2:
        if query_len == 1:
            return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len  # query i sits at position context_len + i

    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    query_index = query_tile * BLOCK_Q + rows // GROUP_PAD
    head = kv_head * GROUP + rows % GROUP_PAD
    row_valid = (query_index < query_len) & (rows % GROUP_PAD < GROUP)
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = dims < HEAD_DIM
    token = (query_start + query_index).to(tl.int64)
    query = tl.load(query_ptr + token[:, None] * stride_query_token + head[:, None] * stride_query_head
                    + dims[None, :], mask=row_valid[:, None] & dim_valid[None, :], other=0.0)
    if HALF_PRODUCTS:  # every tile is widened to the query's type: float16 is one instruction from float8
        query = tl.clamp(query.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    query_pos = context_len + query_index

    # Keys this tile can see: causal up to its last query; with a window, from its first query's window start.
    key_end = context_len + tl.minimum((query_tile + 1) * BLOCK_Q, query_len)
    key_begin = 0
    if USE_WINDOW:
        key_begin = tl.maximum(context_len + query_tile * BLOCK_Q - sliding_window + 1, 0)
    per_split = tl.cdiv(tl.cdiv(key_end - key_begin, NUM_SPLITS), TILE_N) * TILE_N
    split_begin = key_begin + split * per_split
    split_end = tl.minimum(key_end, split_begin + per_split)

    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    if USE_SINKS:
        if split == 0:
            sink = tl.load(sinks_ptr + head, mask=row_valid, other=0.0).to(tl.float32) * 1.4426950408889634
            m_i = tl.where(row_valid, sink, m_i)
            l_i = tl.where(row_valid, 1.0, l_i)
    kv_offset = kv_head * HEAD_DIM + dims
    masked_begin = split_begin
    if SPLIT_CAUSAL:
        # Keys before the tile's first query are visible to every row: whole tiles of them go without the masks.
        masked_begin = split_begin + (tl.maximum(context_len + query_tile * BLOCK_Q - split_begin, 0)
                                      // TILE_N) * TILE_N
        for start in range(split_begin, masked_begin, TILE_N):
            m_i, l_i, acc = _attend_tile(query, key_cache_ptr, value_cache_ptr, block_tables_ptr, seq,
                                         stride_block_table, start, split_end, query_pos, sliding_window, kv_offset,
                                         dim_valid, scale_log2, m_i, l_i, acc, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE,
                                         TILE_N, USE_WINDOW, False, DOT_PRECISION)
    for start in range(masked_begin, split_end, TILE_N):
        m_i, l_i, acc = _attend_tile(query, key_cache_ptr, value_cache_ptr, block_tables_ptr, seq,
                                     stride_block_table, start, split_end, query_pos, sliding_window, kv_offset,
                                     dim_valid, scale_log2, m_i, l_i, acc, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE,
                                     TILE_N, USE_WINDOW, True, DOT_PRECISION)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if HAS_KV_SCALE:  # sum p (v_scale * v) = v_scale * sum p v; split partials too, their combination is linear
        out = out * tl.load(v_scale_ptr)
    store_mask = row_valid[:, None] & dim_valid[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + token[:, None] * stride_out_token + head[:, None] * stride_out_head + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        # partial_out [T, H, NUM_SPLITS, D] and partial_lse [T, H, NUM_SPLITS], float32, log2 domain.
        partial_row = (token * (NUM_KV_HEADS * GROUP) + head) * NUM_SPLITS + split
        tl.store(partial_out_ptr + partial_row[:, None] * HEAD_DIM + dims[None, :], out, mask=store_mask)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_i))
        tl.store(partial_lse_ptr + partial_row, lse, mask=row_valid)


def flat_tiles(num_tokens: int, num_seqs: int, block_q: int) -> int:
    """Query-tile programs of a prefill or mixed batch: one flat range shared by all requests, request i's tiles
    starting at query_start_loc[i] // block_q + i. That bound (a request may waste one tile) depends only on the
    batch's shape, not on its lengths, so the launch is the same for every batch of a shape and can be captured in
    a CUDA graph (serval.engine.mixed_graphs); programs past a request's queries exit at once."""
    return num_tokens // block_q + num_seqs


def decode_num_splits(num_seqs: int, num_kv_heads: int) -> int:
    """Splits per sequence so that a decode batch has about _TARGET_PROGRAMS programs: a power of two, 1..32."""
    wanted = -(-_TARGET_PROGRAMS // max(num_seqs * num_kv_heads, 1))
    return min(triton.next_power_of_2(wanted), _MAX_SPLITS)


def launch_shape(max_query_len: int, num_seqs: int, num_kv_heads: int, group_pad: int,
                 split_queries: bool = False, prefill_rows: int = _PREFILL_ROWS) -> tuple[int, int, bool]:
    """(BLOCK_Q, NUM_SPLITS, FLAT_TILES) for a batch whose requests have at most max_query_len query tokens.

    Decode (one token each) runs split-K over one query tile per request, and so does a batch that asks for it
    (split_queries: a speculative verify step's graph, k drafts + 1 tokens a request), so a batch of a few
    requests still has ~_TARGET_PROGRAMS programs: a verify step at batch 1 otherwise ran one program per KV head
    (8 on Llama-3-8B), each walking the whole context alone. Only on request, because each (BLOCK_Q, NUM_SPLITS)
    is a kernel to compile, and verify graphs compile theirs at capture, not in the middle of serving. Anything
    else runs the flat grid of prefill_rows-row tiles (PrefillConfig.rows). max_query_len only has to bound the
    requests' query lengths (a captured batch passes its padded length), so the grid depends on shapes alone."""
    if max_query_len == 1:
        return max(1, _DECODE_ROWS // group_pad), decode_num_splits(num_seqs, num_kv_heads), False
    block_q = max(triton.next_power_of_2(max(max_query_len, 1)), _DECODE_ROWS // group_pad)
    if split_queries and 1 < max_query_len <= _SMALL_QUERY_TOKENS and block_q * group_pad <= _PREFILL_ROWS:
        return block_q, decode_num_splits(num_seqs, num_kv_heads), False
    return max(1, prefill_rows // group_pad), 1, True


def fp8_half_products(kv_cache: torch.Tensor, query: torch.Tensor) -> bool:
    """A float8 cache read by a bfloat16 query takes its products in float16: widening float8 to float16 is one
    instruction a pair on the GPU, to bfloat16 several, and that conversion, not the bytes, set the time of
    fp8-cache attention (no faster than a bfloat16 cache at decode, slower beside a prompt). float16 holds every
    float8 e4m3 value exactly and the softmax's probabilities more finely than bfloat16; the query is clamped to
    float16's range (+-65504). SERVAL_FP8_ATTENTION_HALF=0 keeps bfloat16 products."""
    return (kv_cache.dtype == torch.float8_e4m3fn and query.dtype == torch.bfloat16
            and os.environ.get("SERVAL_FP8_ATTENTION_HALF", "1") != "0")


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                    sliding_window: int | None = None, out: torch.Tensor | None = None,
                    sinks: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None, prefill: PrefillConfig | None = None,
                    decode: PrefillConfig | None = None, half_products: bool | None = None,
                    split_decodes: bool | None = None) -> torch.Tensor:
    """Causal attention of query [T, H, D] over each request's cached K/V -> [T, H, D]; the reference's contract.
    prefill, decode: the flat and the decode launch's configurations (None: this GPU's table, prefill_config and
    decode_config; the tuners pass their candidates). half_products: fp8_half_products's rule unless given.
    split_decodes (default on; SERVAL_ATTENTION_SPLIT_DECODES=0 turns it off): a batch that runs the flat grid
    serves its single-token requests in a second launch over the decode grid with the decode configuration, a
    program a request and KV head; the flat launch's programs for them exit at once. Both grids depend on shapes
    alone, so a captured mixed step replays either way.

    A decode batch (one query token a request), or one with metadata.split_queries and at most
    _SMALL_QUERY_TOKENS query tokens a request (a verify step's graph), runs split-K and reads no host-side
    lengths, so it may be captured in a CUDA graph; any other batch runs one program per
    tile of BLOCK_Q query tokens, over a grid set by T and the block table's rows only (flat_tiles), and is
    graph-safe too: metadata.max_query_len only picks between the two (launch_shape).
    """
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = kv_cache.shape[3]
    group_pad = triton.next_power_of_2(num_heads // num_kv_heads)
    num_seqs = metadata.block_tables.shape[0]
    if out is None:
        out = torch.empty_like(query)
    config = prefill or prefill_config(query.device, head_dim, group_pad)
    block_q, num_splits, flat = launch_shape(metadata.max_query_len, num_seqs, num_kv_heads, group_pad,
                                             metadata.split_queries, config.rows)
    decode = decode or decode_config(query.device, head_dim, group_pad)
    if not flat:
        config = decode
    if half_products is None:
        half_products = fp8_half_products(kv_cache, query)
    if split_decodes is None:
        split_decodes = os.environ.get("SERVAL_ATTENTION_SPLIT_DECODES", "1") != "0"
    assert query.stride(-1) == 1 and out.stride(-1) == 1 and kv_cache.is_contiguous()
    launch = functools.partial(_launch, query, kv_cache, metadata, scale, sliding_window, out, sinks, k_scale,
                               v_scale, half_products)
    if flat and split_decodes:
        # The prompt tiles in the flat grid, the single-token requests in the decode grid with decode's launch:
        # a flat tile built for prompts spends most of its rows and pipeline on a lone decode token.
        launch(block_q, 1, True, config, QUERY_MULTI)
        launch(max(1, _DECODE_ROWS // group_pad), 1, False, decode, QUERY_SINGLE)
    else:
        launch(block_q, num_splits, flat, config, QUERY_ANY)
    return out


# Which requests a launch serves (split_decodes): all, only those with one query token, only those with more.
QUERY_ANY, QUERY_SINGLE, QUERY_MULTI = 0, 1, 2


def _launch(query, kv_cache, metadata, scale, sliding_window, out, sinks, k_scale, v_scale, half_products,
            block_q: int, num_splits: int, flat: bool, config: PrefillConfig, query_filter: int) -> None:
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    group = num_heads // num_kv_heads
    num_seqs = metadata.block_tables.shape[0]
    grid = ((flat_tiles(num_tokens, num_seqs, block_q), 1, num_kv_heads) if flat
            else (1, num_seqs, num_kv_heads * num_splits))
    partial_out = partial_lse = out
    if num_splits > 1:
        partial_out = torch.empty((num_tokens, num_heads, num_splits, head_dim), dtype=torch.float32,
                                  device=query.device)
        partial_lse = torch.empty((num_tokens, num_heads, num_splits), dtype=torch.float32, device=query.device)
    _attention_kernel[grid](
        query, kv_cache[0], kv_cache[1], out, partial_out, partial_lse,
        metadata.block_tables, metadata.seq_lens_tensor, metadata.query_start_loc_tensor,
        sinks if sinks is not None else out, scale * _LOG2E, sliding_window or 0,
        k_scale if k_scale is not None else partial_lse, v_scale if v_scale is not None else partial_lse, num_seqs,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), metadata.block_tables.stride(0),
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=triton.next_power_of_2(group), BLOCK_Q=block_q,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)), BLOCK_SIZE=block_size,
        TILE_N=config.tile_n, NUM_SPLITS=num_splits, USE_WINDOW=sliding_window is not None, USE_SINKS=sinks is not None,
        HAS_KV_SCALE=k_scale is not None, FLAT_TILES=flat,
        SPLIT_CAUSAL=bool(config.split_causal) and flat and sliding_window is None,
        # float32 models ask for float32 products: tl.dot would otherwise round float32 inputs to TF32 on a GPU,
        # enough to flip near-tie greedy tokens against the CPU engine (seen with gpt-oss's sinks)
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", HALF_PRODUCTS=half_products,
        QUERY_FILTER=query_filter, num_warps=config.num_warps, num_stages=config.num_stages,
        **pdl.launch_options(query))
    if num_splits > 1:
        _combine_splits(partial_out, partial_lse, out)


@triton.jit
def _combine_splits_kernel(partial_out_ptr, partial_lse_ptr, out_ptr, stride_out_token, stride_out_head,
                           NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
                           HEAD_DIM_PAD: tl.constexpr, USE_PDL: tl.constexpr):
    pdl.wait(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    first = (token * NUM_HEADS + head) * NUM_SPLITS
    splits = tl.arange(0, NUM_SPLITS)
    lse = tl.load(partial_lse_ptr + first + splits)
    lse_max = tl.max(lse, 0)
    weights = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))
    total = tl.sum(weights, 0)
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = dims < HEAD_DIM
    partial = tl.load(partial_out_ptr + (first + splits)[:, None] * HEAD_DIM + dims[None, :],
                      mask=dim_valid[None, :], other=0.0)
    out = tl.sum(weights[:, None] * partial, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + token * stride_out_token + head * stride_out_head + dims, out.to(out_ptr.dtype.element_ty),
             mask=dim_valid)


def _combine_splits(partial_out: torch.Tensor, partial_lse: torch.Tensor, out: torch.Tensor) -> None:
    """out = sum_s 2^(lse_s - max) * partial_s / sum_s 2^(lse_s - max); rows with no keys (padding) give 0."""
    num_tokens, num_heads, num_splits, head_dim = partial_out.shape
    _combine_splits_kernel[(num_tokens, num_heads)](
        partial_out, partial_lse, out, out.stride(0), out.stride(1), NUM_HEADS=num_heads, NUM_SPLITS=num_splits,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim), **pdl.launch_options(out))
