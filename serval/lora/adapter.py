"""A PEFT LoRA adapter read from its folder and checked against the base model.

A PEFT folder holds adapter_config.json (r, lora_alpha, use_rslora, target_modules, ...) and
adapter_model.safetensors with, per adapted projection, `...layers.N.self_attn.q_proj.lora_A.weight` [r, in] and
`...lora_B.weight` [out, r]. The adapted projection computes W x + scaling * B A x, with scaling lora_alpha / r, or
lora_alpha / sqrt(r) with rsLoRA (Kalajdzievski, 2023). Scaling is folded into B here, once, so the kernels never
see it. Serval merges q/k/v and gate/up into one projection each: their adapters become slices of it.

Everything a bad adapter can get wrong is refused here with InvalidArgument naming what and why, before any of it
reaches the model: missing files, a rank over --max-lora-rank, shapes that don't match the base, target modules
the model doesn't have (or adapters of the embeddings and LM head, which Serval doesn't apply), biases, DoRA.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch

from serval.lora.request import LoRARequest
from serval.openai.errors import InvalidArgument

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT's module name -> the slice of Serval's merged projection it is (None: the projection is not merged).
PROJECTION_SLICES: dict[str, tuple[str, str | None]] = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"), "o_proj": ("o_proj", None),
    "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"), "down_proj": ("down_proj", None),
}
_UNSUPPORTED_MODULES = ("embed_tokens", "lm_head", "wte", "embed_out")
_TENSOR_NAME = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|"
                          r"lora_embedding_B|lora_magnitude_vector)(?:\.[^.]+)?\.weight$|"
                          r"^(?:base_model\.model\.)?(?P<other>.+)$")

# (Serval module path, slice name or None) -> a projection the adapter may adapt.
TargetKey = tuple[str, str | None]


@dataclass(frozen=True)
class TargetShape:
    """What a LoRA pair on one projection (slice) must measure: A is [rank, in_features], B [out_features, rank]."""
    in_features: int
    out_features: int


@dataclass
class LoRAPair:
    """One adapted projection: x -> b @ (a @ x), with the adapter's scaling already in b."""
    a: torch.Tensor  # [rank, in_features]
    b: torch.Tensor  # [out_features, rank]


@dataclass
class LoRAAdapter:
    """An adapter in host memory, checked against the model, ready to be copied into a resident slot."""
    request: LoRARequest
    rank: int
    scaling: float
    pairs: dict[TargetKey, LoRAPair]

    @property
    def adapter_id(self) -> int:
        return self.request.lora_int_id

    @property
    def num_bytes(self) -> int:
        return sum(p.a.numel() * p.a.element_size() + p.b.numel() * p.b.element_size() for p in self.pairs.values())


def load_adapter(request: LoRARequest, targets: dict[TargetKey, TargetShape], max_lora_rank: int,
                 dtype: torch.dtype) -> LoRAAdapter:
    """Read and check the adapter at request.lora_path; raise InvalidArgument("lora_path", ...) on anything wrong."""
    path = request.lora_path
    config = _read_config(path)
    _check_config(config, path)
    weights = _read_weights(path)
    rank = int(config.get("r", 0))
    if not 1 <= rank <= max_lora_rank:
        raise _bad(path, f"its rank r={rank} is over --max-lora-rank {max_lora_rank}" if rank > max_lora_rank
                   else f"its rank r={rank} must be >= 1")
    alpha = float(config.get("lora_alpha", rank))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    pairs = _pairs(weights, targets, path)
    for key, (a, b) in pairs.items():
        _check_pair(key, a, b, targets[key], rank, path)
    return LoRAAdapter(request, rank, scaling, {key: LoRAPair(a.to(dtype).contiguous(), (b.float() * scaling).to(dtype))
                                                for key, (a, b) in pairs.items()})


def _bad(path: str, reason: str) -> InvalidArgument:
    return InvalidArgument("lora_path", f"invalid LoRA adapter {path!r}: {reason}")


def _read_config(path: str) -> dict:
    if not os.path.isdir(path):
        raise _bad(path, "no such folder")
    config_file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_file):
        raise _bad(path, f"{CONFIG_FILE} is missing (a PEFT adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        with open(config_file) as f:
            config = json.load(f)
    except (OSError, ValueError) as error:
        raise _bad(path, f"{CONFIG_FILE} is not readable JSON ({error})") from None
    if not isinstance(config, dict):
        raise _bad(path, f"{CONFIG_FILE} must hold a JSON object")
    return config


def _check_config(config: dict, path: str) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise _bad(path, f"peft_type {peft_type} is not supported; allowed LORA")
    if config.get("bias", "none") != "none":
        raise _bad(path, f"bias={config['bias']!r} is not supported; allowed bias='none'")
    if config.get("use_dora"):
        raise _bad(path, "DoRA adapters (use_dora) are not supported")
    if config.get("modules_to_save"):
        raise _bad(path, f"modules_to_save {config['modules_to_save']} is not supported: Serval applies LoRA to "
                         "the attention and MLP projections only")
    if config.get("alpha_pattern") or config.get("rank_pattern"):
        raise _bad(path, "per-module rank_pattern/alpha_pattern is not supported; one r and lora_alpha for all")
    target_modules = config.get("target_modules") or []
    if isinstance(target_modules, str):
        return  # a regular expression: the tensors present say which modules it matched
    for module in target_modules:
        _check_module_name(module.split(".")[-1], path)


def _check_module_name(module: str, path: str) -> None:
    if module in _UNSUPPORTED_MODULES:
        raise _bad(path, f"it adapts {module!r}: LoRA on the embeddings or the LM head is not supported; allowed "
                         f"target modules {sorted(PROJECTION_SLICES)}")
    if module not in PROJECTION_SLICES:
        raise _bad(path, f"unknown target module {module!r}: allowed {sorted(PROJECTION_SLICES)}")


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    weights_file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights_file):
        other = " (adapter_model.bin is not read: save with safe_serialization)" if os.path.isfile(
            os.path.join(path, "adapter_model.bin")) else ""
        raise _bad(path, f"{WEIGHTS_FILE} is missing{other}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(weights_file)
    except (SafetensorError, OSError, ValueError) as error:
        raise _bad(path, f"{WEIGHTS_FILE} is not a readable safetensors file ({error})") from None


def _pairs(weights: dict[str, torch.Tensor], targets: dict[TargetKey, TargetShape],
           path: str) -> dict[TargetKey, tuple[torch.Tensor, torch.Tensor]]:
    found: dict[TargetKey, dict[str, torch.Tensor]] = {}
    for name, tensor in weights.items():
        match = _TENSOR_NAME.match(name)
        if match.group("module") is None:
            raise _bad(path, f"unexpected tensor {name!r}: allowed only lora_A/lora_B weights")
        module, part = match.group("module"), match.group("part")
        if part not in ("lora_A", "lora_B"):
            raise _bad(path, f"tensor {name!r}: LoRA on the embeddings or the LM head (or DoRA) is not supported")
        parent, _, projection = module.rpartition(".")
        _check_module_name(projection, path)
        merged, slice_name = PROJECTION_SLICES[projection]
        key = (f"{parent}.{merged}", slice_name)
        if key not in targets:
            raise _bad(path, f"tensor {name!r} adapts {module!r}, which the base model does not have")
        found.setdefault(key, {})[part] = tensor
    if not found:
        raise _bad(path, f"{WEIGHTS_FILE} holds no lora_A/lora_B weights")
    pairs = {}
    for key, parts in found.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise _bad(path, f"{_hf_name(key)} has {sorted(parts)} but needs both lora_A and lora_B")
        pairs[key] = parts["lora_A"], parts["lora_B"]
    return pairs


def _check_pair(key: TargetKey, a: torch.Tensor, b: torch.Tensor, shape: TargetShape, rank: int, path: str) -> None:
    expected_a, expected_b = (rank, shape.in_features), (shape.out_features, rank)
    if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
        raise _bad(path, f"{_hf_name(key)} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; the base model "
                         f"with r={rank} needs {expected_a} and {expected_b} (was it trained on another model?)")
    if not (a.is_floating_point() and b.is_floating_point()):
        raise _bad(path, f"{_hf_name(key)} is not floating point")


def _hf_name(key: TargetKey) -> str:
    module, slice_name = key
    parent, _, merged = module.rpartition(".")
    projection = next(p for p, (m, s) in PROJECTION_SLICES.items() if m == merged and s == slice_name)
    return f"{parent}.{projection}"
