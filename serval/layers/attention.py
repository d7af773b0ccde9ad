"""Attention over the paged KV cache: the metadata the runner builds each step, and the layer that uses it.

The layer takes this step's q/k/v as the projections give them and does the rest: rotate q and k by position,
write k and v into the cache, then attend over the cache only, so a request's cached prefix, earlier prefill
chunks and this step's tokens are all read the same way, through its block table. A model file calls it the same
on every device. Which implementation runs is chosen here: the Triton kernels on CUDA (rotation and K/V write fused
in one kernel), the torch reference elsewhere; SERVAL_ATTENTION_BACKEND=torch|triton overrides (as
VLLM_ATTENTION_BACKEND does), e.g. to run the Triton kernels in the interpreter on CPU (TRITON_INTERPRET=1) or the
reference on a GPU.

A float8 KV cache may have per-layer scales (k_scale, v_scale: serval.layers.quant.kv_scales, from the checkpoint
or from the first prefill): the cache then holds k / k_scale and v / v_scale and attention reads them back scaled.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from serval.kernels import paged_attention as torch_backend
from serval.layers.rotary import RotaryEmbedding

_BACKENDS = ("torch", "triton")


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block_id * block_size + offset) of each new token's K/V
    query_start_loc: list[int]  # [B + 1] host: request i's new tokens are rows query_start_loc[i]:[i + 1]
    seq_lens: list[int]  # [B] host: request i's context length including this step's tokens
    block_tables: torch.Tensor  # [B, max_blocks_per_seq] int32, padded with 0
    block_size: int
    # Derived once per step (not per layer) in __post_init__ when left at their defaults.
    max_query_len: int = 0
    max_seq_len: int = 0
    seq_lens_tensor: torch.Tensor | None = field(default=None, repr=False)  # [B] int32 on block_tables' device
    query_start_loc_tensor: torch.Tensor | None = field(default=None, repr=False)  # [B + 1] int32, same device
    # A hybrid KV cache (serval.engine.kv_groups): per KV cache group, this metadata with the group's slots and
    # block table; a layer with a kv_cache_group reads its own. None: every layer reads this one.
    kv_groups: list[AttentionMetadata] | None = field(default=None, repr=False)
    # Each request's few query tokens (at most triton_attention._SMALL_QUERY_TOKENS) fit one tile: the Triton
    # kernel splits its keys across programs as for decode (a verify step's graph: spec_decode.padded_graphs).
    split_queries: bool = False
    # The torch backend's per-step decode plan (serval.kernels.paged_attention.decode_plan): None until its first
    # layer builds it, False for a step without single-token queries.
    decode_plan: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if len(self.query_start_loc) != len(self.seq_lens) + 1:
            raise ValueError(f"query_start_loc has {len(self.query_start_loc)} entries for "
                             f"{len(self.seq_lens)} requests; expected {len(self.seq_lens) + 1}")
        if not self.max_query_len and self.seq_lens:
            self.max_query_len = max(b - a for a, b in zip(self.query_start_loc, self.query_start_loc[1:]))
        if not self.max_seq_len and self.seq_lens:
            self.max_seq_len = max(self.seq_lens)
        if self.seq_lens_tensor is None:
            self.seq_lens_tensor = torch.tensor(self.seq_lens, dtype=torch.int32, device=self.block_tables.device)
        if self.query_start_loc_tensor is None:
            self.query_start_loc_tensor = torch.tensor(self.query_start_loc, dtype=torch.int32,
                                                       device=self.block_tables.device)

    @property
    def num_requests(self) -> int:
        return len(self.seq_lens)


class Attention(nn.Module):
    """softmax(q k^T * scale) v with grouped-query heads over the paged cache, q and k rotated first (RoPE) when
    the layer has a rotary embedding; no weights of its own."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 rotary_emb: RotaryEmbedding | None = None, sliding_window: int | None = None) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads ({num_heads}) must be a multiple of "
                             f"num_key_value_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.rotary_emb = rotary_emb  # usually one module shared by every layer of the model
        self.sliding_window = sliding_window
        self.kv_cache_group: int | None = None  # set by serval.engine.kv_groups when the model's cache is hybrid
        self._backend = None  # chosen on the first call, when the device is known
        # A float8 cache's per-layer scales (serval.layers.quant.kv_scales). Device tensors, not floats: the kernels
        # read them, so decode graphs captured before the first prefill calculates them replay the right values.
        self.register_buffer("k_scale", torch.ones((), dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones((), dtype=torch.float32), persistent=False)
        self.has_kv_scales = False  # set by the loader or enable_kv_scale_calculation; else scale 1.0, no reads
        self.calculate_kv_scales = False  # take them from the next prefill batch

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """positions [T], query [T, H, D], key/value [T, KVH, D] of this step's tokens, not rotated -> [T, H, D].
        query and key may be views of a merged projection; the fused path rotates them in place. sinks [H]
        (gpt-oss): a learned logit per head that joins every softmax with no value."""
        if self._backend is None:
            self._backend = attention_backend(query.device)
        if self.kv_cache_group is not None and metadata.kv_groups is not None:
            metadata = metadata.kv_groups[self.kv_cache_group]
        if self.has_kv_scales and kv_cache.dtype == torch.float8_e4m3fn:
            return self._forward_scaled(positions, query, key, value, kv_cache, metadata, sinks)
        if self.rotary_emb is not None and self._backend is not torch_backend:
            # One kernel rotates and stores, a launch fewer per layer; attention then reads k from the cache only.
            query = self.rotary_emb.rotate_and_write_kv(positions, query, key, value, kv_cache, metadata.slot_mapping)
        else:
            if self.rotary_emb is not None:
                query, key = self.rotary_emb(positions, query, key)
            self._backend.write_kv(kv_cache, key, value, metadata.slot_mapping)
        if sinks is not None:
            return self._backend.paged_attention(query, kv_cache, metadata, self.scale, self.sliding_window,
                                                 sinks=sinks)
        return self._backend.paged_attention(query, kv_cache, metadata, self.scale, self.sliding_window)

    def _forward_scaled(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        kv_cache: torch.Tensor, metadata: AttentionMetadata,
                        sinks: torch.Tensor | None = None) -> torch.Tensor:
        """forward with a scaled float8 cache: rotate, write k / k_scale and v / v_scale, attend reading them back
        scaled. (Not the fused rotate-and-write kernel, which stores with scale 1.0.)"""
        # The first prefill (more than one token a request) sets the scales; decode steps, as the graph capture's
        # warm-ups are, never do, nor does anything captured.
        if self.calculate_kv_scales and metadata.max_query_len > 1 and not _capturing(query):
            from serval.layers.quant.kv_scales import calculate_kv_scales
            calculate_kv_scales(key, value, self.k_scale, self.v_scale)
            self.calculate_kv_scales = False
        if self.rotary_emb is not None:
            query, key = self.rotary_emb(positions, query, key)
        self._backend.write_kv(kv_cache, key, value, metadata.slot_mapping, k_scale=self.k_scale,
                               v_scale=self.v_scale)
        return self._backend.paged_attention(query, kv_cache, metadata, self.scale, self.sliding_window,
                                             sinks=sinks, k_scale=self.k_scale, v_scale=self.v_scale)


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def attention_backend(device: torch.device):
    """The module holding write_kv and paged_attention for this device (see the module docstring)."""
    name = os.environ.get("SERVAL_ATTENTION_BACKEND") or ("triton" if device.type == "cuda" else "torch")
    if name not in _BACKENDS:
        raise ValueError(f"invalid SERVAL_ATTENTION_BACKEND={name!r}: allowed {list(_BACKENDS)}")
    if name == "torch":
        return torch_backend
    from serval.kernels import triton_attention  # imports triton, which CPU-only installs may lack
    return triton_attention
