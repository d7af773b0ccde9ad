"""Per-layer scales of a float8 KV cache (kv_cache_dtype="fp8"): read from a checkpoint that carries them, or
calculated from the first prefill batch, instead of 1.0.

A float8 e4m3 cache holds values up to 448. Stored with scale 1.0, a key or value past that saturates, and small
ones lose bits to the format's few exponents. With a per-layer scale s the cache holds x / s and attention reads
s * cached, so the range is the layer's own (serval.layers.attention applies them; the kernels read them as
device tensors, so CUDA graphs captured before the scales are known replay with the right ones).

Checkpoint names (the ones vLLM's maybe_remap_kv_scale_name and compressed-tensors read), per attention module P
(e.g. model.layers.3.self_attn):

    P.k_scale, P.v_scale                    llm-compressor / vLLM fp8 checkpoints (also P.attn.k_scale)
    P.k_proj.k_scale, P.v_proj.v_scale      NVIDIA ModelOpt
    P.k_proj.output_scale, P.v_proj.output_scale   compressed-tensors kv_cache_scheme (older exports)
    P.kv_scale                              deprecated single scale, used for both

Calculated scales follow vLLM's calculate_kv_scales: amax(|k|) / 200 and amax(|v|) / 100 over the first batch.
The headroom below 448 is for later tokens larger than the first batch's, and for keys, which are measured
before the rotary embedding: rotating a pair can grow an element by up to sqrt(2).
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

# vLLM's K_SCALE_CONSTANT and V_SCALE_CONSTANT: the value amax maps to in the cache.
K_SCALE_RANGE = 200.0
V_SCALE_RANGE = 100.0
MIN_SCALE = 1e-12  # an all-zero first batch must not give a zero scale

# Most specific first: "k_proj.k_scale" also ends in "k_scale".
_PATTERNS = (
    (re.compile(r"^(?P<prefix>.+?)\.(?P<which>q|k|v)_proj\.(?P=which)_scale$"), None),
    (re.compile(r"^(?P<prefix>.+?)\.(?P<which>q|k|v)_proj\.output_scale$"), None),
    (re.compile(r"^(?P<prefix>.+?)\.(?:attn\.)?(?P<which>q|k|v|prob)_scale$"), None),
    (re.compile(r"^(?P<prefix>.+?)\.(?:attn\.)?kv_scale$"), "kv"),
)
# Scales for float8 attention math (queries, probabilities), which Serval does not do: read and dropped.
_UNUSED = ("q", "prob")


@dataclass(frozen=True)
class KVScaleName:
    """Where a checkpoint's attention scale belongs: the attention module's checkpoint prefix, and k, v, kv (both),
    or q / prob (unused here)."""
    attention: str
    which: str


def parse_kv_scale_name(hf_name: str) -> KVScaleName | None:
    """The KV-cache scale a checkpoint tensor name holds, or None for any other tensor."""
    for pattern, which in _PATTERNS:
        match = pattern.match(hf_name)
        if match:
            return KVScaleName(match.group("prefix"), which or match.group("which"))
    return None


def kv_scale_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Each attention layer (serval.layers.attention.Attention), by its parent module's name: the checkpoint's
    attention prefix (model.layers.3.self_attn holds .attn)."""
    from serval.layers.attention import Attention
    return {name.rsplit(".", 1)[0]: module for name, module in model.named_modules()
            if isinstance(module, Attention) and "." in name}


def take_kv_scales(model: torch.nn.Module,
                   weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors less its KV-cache scales, which are set on the attention layers on the way.
    Raises ValueError naming a scale that has no attention layer or is not one number."""
    layers = kv_scale_modules(model)
    for hf_name, tensor in weights:
        name = parse_kv_scale_name(hf_name)
        if name is None:
            yield hf_name, tensor
            continue
        if name.which in _UNUSED:
            continue
        attention = layers.get(name.attention)
        if attention is None:
            raise ValueError(f"KV-cache scale {hf_name!r}: the model has no attention layer {name.attention!r}")
        if tensor.numel() != 1:
            raise ValueError(f"KV-cache scale {hf_name!r} has shape {tuple(tensor.shape)}; Serval reads one scale "
                             "per layer (per-head KV scales are not supported)")
        value = float(tensor.float().reshape(()))
        if not value > 0 or value != value or value == float("inf"):
            raise ValueError(f"KV-cache scale {hf_name!r} is {value}; it must be a positive finite number")
        for which in ("k", "v") if name.which == "kv" else (name.which,):
            set_kv_scale(attention, which, value)


def set_kv_scale(attention: torch.nn.Module, which: str, value: float) -> None:
    getattr(attention, f"{which}_scale").fill_(value)
    attention.has_kv_scales = True


def enable_kv_scale_calculation(model: torch.nn.Module) -> None:
    """Every attention layer takes its scales from the next prefill batch (vLLM's calculate_kv_scales). Call it
    after the memory profile's forward and before CUDA graph capture: the captured steps then read the scales'
    tensors, which the first real prefill fills."""
    for attention in kv_scale_modules(model).values():
        attention.has_kv_scales = True
        attention.calculate_kv_scales = True


def layers_awaiting_kv_scales(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention layers whose next prefill still calculates their scales."""
    return [module for module in model.modules() if getattr(module, "calculate_kv_scales", False)]


@contextmanager
def kv_scales_frozen(model: torch.nn.Module) -> Iterator[None]:
    """While capturing CUDA graphs: warm-ups of several rows look like a prefill, whose first one would calculate
    the scales from dummy inputs; keep them from it, and give the calculation back to the first real prefill."""
    pending = layers_awaiting_kv_scales(model)
    for module in pending:
        module.calculate_kv_scales = False
    try:
        yield
    finally:
        for module in pending:
            module.calculate_kv_scales = True


def calculate_kv_scales(key: torch.Tensor, value: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
    """Fill k_scale and v_scale (float32, in place, on the device: no host sync) from one batch's key and value."""
    k_scale.copy_((key.abs().amax().float() / K_SCALE_RANGE).clamp_min(MIN_SCALE))
    v_scale.copy_((value.abs().amax().float() / V_SCALE_RANGE).clamp_min(MIN_SCALE))
