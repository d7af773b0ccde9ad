"""Rotary position embedding (Su et al., 2021, RoFormer) in the rotate-half layout HF Llama checkpoints use.

cos/sin are precomputed in float32 for every position up to max_position and indexed by each token's position,
so a flat batch of tokens from many requests at different offsets is rotated in one gather. Frequency scaling:
`linear` (Chen et al., 2023, position interpolation) and `llama3` (Llama 3.1's wavelength-dependent blend);
the formulas are transformers' (modeling_rope_utils) so logits match it.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def rope_parameters(config) -> dict[str, Any]:
    """rope_theta and scaling of a config, whichever spelling it uses.

    transformers 5 keeps everything in `config.rope_parameters` (rope_theta included, rope_type "default" when
    unscaled); transformers 4 and older config.json files have `rope_theta` plus an optional `rope_scaling`
    whose type key is `rope_type` or, older still, `type`.
    """
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", None) or 10000.0
    return params


def inverse_frequencies(head_dim: int, params: dict[str, Any]) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/d), then scaled as params' rope_type says; float32, [head_dim // 2]."""
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / params["factor"]
    if rope_type == "llama3":
        return _llama3_scaled(inv_freq, params)
    raise ValueError(f"rope_type {rope_type!r} is not supported; supported: ['default', 'linear', 'llama3']")


def _llama3_scaled(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    # Wavelengths longer than the original context are stretched by `factor`, shorter than context/high_freq_factor
    # are kept, and the band between is interpolated smoothly.
    factor = params["factor"]
    low_freq_factor, high_freq_factor = params["low_freq_factor"], params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, D] by per-token cos/sin [T, D/2]: pairs are (i, i + D/2), HF's rotate_half layout."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, params: dict[str, Any]) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq = inverse_frequencies(head_dim, params)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        # float32 whatever the model dtype: bf16 cannot tell apart neighbouring positions past a few hundred.
        self.register_buffer("cos_cache", freqs.cos().to(torch.float32), persistent=False)
        self.register_buffer("sin_cache", freqs.sin().to(torch.float32), persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor,
                key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query [T, H, D], key [T, KVH, D], positions [T] -> rotated (query, key)."""
        if query.is_cuda:  # one fused kernel for q and k, in place (serval.kernels.triton_fused)
            from serval.kernels import triton_fused
            return triton_fused.rotary_(positions, query, key, self.cos_cache, self.sin_cache)
        cos, sin = self.cos_cache[positions], self.sin_cache[positions]
        return apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)

    def rotate_and_write_kv(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        """Rotate query and key in place and store the rotated key and value at their cache slots, in one Triton
        kernel (one launch fewer per layer than rotating and then writing); what the Triton attention backend runs
        (compiled on CUDA, interpreted on CPU with TRITON_INTERPRET=1). Returns query."""
        from serval.kernels import triton_fused
        triton_fused.rotary_(positions, query, key, self.cos_cache, self.sin_cache, value, kv_cache, slot_mapping)
        return query
