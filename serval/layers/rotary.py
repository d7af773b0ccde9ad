"""Rotary position embedding (Su et al., 2021, RoFormer) in the rotate-half layout HF Llama checkpoints use.

cos/sin are precomputed in float32 for every position up to max_position and indexed by each token's position,
so a flat batch of tokens from many requests at different offsets is rotated in one gather. Frequency scaling:
`linear` (Chen et al., 2023, position interpolation), `llama3` (Llama 3.1's wavelength-dependent blend),
`longrope` (Ding et al., 2024, Phi-3) and `yarn` (Peng et al., 2023: gpt-oss, DeepSeek-V3, whose attention factor
scales cos and sin); the formulas are transformers' (modeling_rope_utils) so logits match it.
Partial rotary (`partial_rotary_factor` < 1, Phi-4-mini) rotates the first part of each head and passes the rest.

LongRoPE has two sets of frequencies: short factors for contexts within original_max_position_embeddings, long
ones beyond. transformers picks one set per forward call by the call's largest position, and its generate()
recomputes the whole KV cache with the long factors when a sequence first grows past the original context, so
there every token of a long sequence is rotated with the long factors. Here the choice is per position: positions
below the original context use the short factors, the others the long ones. That equals transformers for every
sequence that stays within the original context (and transformers' rotary embedding at each single position), and
it is the same however the engine chunks, batches or caches a prefix. For a sequence past the original context it
differs from generate(): matching it needs the engine to recompute a request's cache when it crosses (later work).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def rope_parameters(config, layer_type: str | None = None) -> dict[str, Any]:
    """rope_theta and scaling of a config, whichever spelling it uses.

    transformers 5 keeps everything in `config.rope_parameters` (rope_theta included, rope_type "default" when
    unscaled); transformers 4 and older config.json files have `rope_theta` plus an optional `rope_scaling`
    whose type key is `rope_type` or, older still, `type`. Models whose layer types rotate differently (Gemma 3:
    "sliding_attention" and "full_attention") keep one such dict per layer type; `layer_type` picks one.
    """
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", None) or 10000.0
    if "partial_rotary_factor" not in params and getattr(config, "partial_rotary_factor", None):
        params["partial_rotary_factor"] = config.partial_rotary_factor
    if params["rope_type"] == "longrope" and "original_max_position_embeddings" not in params:
        params["original_max_position_embeddings"] = config.original_max_position_embeddings
    if params["rope_type"] == "yarn" and params.get("factor") is None:
        # DeepSeek-V3 may leave the factor to the ratio of the two contexts, as transformers does.
        params["factor"] = config.max_position_embeddings / params["original_max_position_embeddings"]
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
    if rope_type == "yarn":
        return _yarn_scaled(head_dim, params)
    raise ValueError(f"rope_type {rope_type!r} is not supported; supported: "
                     "['default', 'linear', 'llama3', 'longrope', 'yarn']")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature, 0.1 * mscale * ln(factor) + 1 (1 when not stretched)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(params: dict[str, Any]) -> float:
    """The factor YaRN multiplies cos and sin by: given, or from mscale / mscale_all_dim (DeepSeek), or from
    the stretch factor alone."""
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    factor, mscale, mscale_all_dim = params["factor"], params.get("mscale"), params.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


def _yarn_scaled(dim: int, params: dict[str, Any]) -> torch.Tensor:
    # Dimensions that turn fewer than beta_slow times over the original context are interpolated (divided by
    # factor), those that turn more than beta_fast times are kept, and a linear ramp blends the band between.
    missing = [key for key in ("factor", "original_max_position_embeddings") if params.get(key) is None]
    if missing:
        raise ValueError(f"rope_type 'yarn' needs {missing} in the config's rope parameters")
    base, factor = float(params["rope_theta"]), params["factor"]
    original = params["original_max_position_embeddings"]
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the ramp needs a width
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


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


def rope_tables(rotary_dim: int, max_position: int, params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_position, rotary_dim // 2] in float32 for every position."""
    positions = torch.arange(max_position, dtype=torch.float32)
    if params["rope_type"] == "longrope":
        return _longrope_tables(rotary_dim, positions, params)
    freqs = torch.outer(positions, inverse_frequencies(rotary_dim, params))
    if params["rope_type"] == "yarn":
        scale = yarn_attention_factor(params)
        return freqs.cos() * scale, freqs.sin() * scale
    return freqs.cos(), freqs.sin()


def _longrope_tables(rotary_dim: int, positions: torch.Tensor,
                     params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    # Short factors below the original context, long ones from it on (see the module docstring), and both scaled
    # by the attention factor sqrt(1 + ln(factor) / ln(original context)).
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or len(positions) / original  # max_position_embeddings / original context
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    base_powers = float(params["rope_theta"]) ** exponents
    short = 1.0 / (torch.tensor(params["short_factor"], dtype=torch.float32) * base_powers)
    long = 1.0 / (torch.tensor(params["long_factor"], dtype=torch.float32) * base_powers)
    inv_freq = torch.where(positions[:, None] < original, short, long)
    freqs = positions[:, None] * inv_freq
    return freqs.cos() * attention_factor, freqs.sin() * attention_factor


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, D] by per-token cos/sin [T, R/2]: pairs are (i, i + R/2), HF's rotate_half layout, over
    the first R dims; the other D - R dims (partial rotary) pass through."""
    rotary_dim = 2 * cos.shape[-1]
    x1, x2 = x[..., :rotary_dim].float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    if rotary_dim < x.shape[-1]:
        rotated = torch.cat((rotated, x[..., rotary_dim:].float()), dim=-1)
    return rotated.to(x.dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, params: dict[str, Any]) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        cos, sin = rope_tables(self.rotary_dim, max_position, params)
        # float32 whatever the model dtype: bf16 cannot tell apart neighbouring positions past a few hundred.
        self.register_buffer("cos_cache", cos.to(torch.float32), persistent=False)
        self.register_buffer("sin_cache", sin.to(torch.float32), persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor,
                key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query [T, H, D], key [T, KVH, D], positions [T] -> rotated (query, key)."""
        if query.is_cuda and self.rotary_dim == self.head_dim:  # one fused kernel for q and k, in place
            from serval.kernels import triton_fused
            return triton_fused.rotary_(positions, query, key, self.cos_cache, self.sin_cache)
        cos, sin = self.cos_cache[positions], self.sin_cache[positions]
        if query.dtype != key.dtype:
            return apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        # q and k rotated as one tensor: the same arithmetic in half the ops, which at decode batch sizes cost more
        # than the arithmetic (a dozen per call, thirty layers a step).
        rotated = apply_rotary(torch.cat((query, key), dim=1), cos, sin)
        return rotated.split((query.shape[1], key.shape[1]), dim=1)

    def rotate_and_write_kv(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        """Rotate query and key in place and store the rotated key and value at their cache slots, in one Triton
        kernel (one launch fewer per layer than rotating and then writing); what the Triton attention backend runs
        (compiled on CUDA, interpreted on CPU with TRITON_INTERPRET=1). Returns query."""
        if self.rotary_dim < self.head_dim:  # the fused kernel rotates whole heads: rotate here, then store
            from serval.kernels import paged_attention
            query, key = self(positions, query, key)
            paged_attention.write_kv(kv_cache, key, value, slot_mapping)
            return query
        from serval.kernels import triton_fused
        triton_fused.rotary_(positions, query, key, self.cos_cache, self.sin_cache, value, kv_cache, slot_mapping)
        return query
