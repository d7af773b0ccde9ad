"""A checkpoint's quantization_config (config.json) -> the format of each linear layer, or a refusal that names
the format and what is unsupported.

    fp8                 per-tensor/per-channel weight_scale, or block-wise weight_scale_inv (weight_block_size)
    compressed-tensors  config_groups (targets "Linear" or "re:<pattern>") and ignore: FP8 W8A8, INT8 W8A8,
                        W4A16 pack-quantized
    awq                 4-bit, GEMM layout ("version": "gemm")
    gptq                4-bit, g_idx (desc_act), sym, checkpoint_format gptq (zero - 1 stored) or gptq_v2
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from serval.layers.quant.base import QuantMethod
from serval.layers.quant.fp8 import BlockFp8Method, Fp8Method
from serval.layers.quant.int8 import Int8Method
from serval.layers.quant.w4a16 import SUPPORTED_GROUP_SIZES, W4A16Method

CHECKPOINT_FORMATS = ("fp8", "compressed-tensors", "awq", "gptq")


@dataclass(frozen=True)
class LayerRule:
    """Layers whose checkpoint name a target matches get method."""
    targets: tuple[str, ...]
    method: QuantMethod


@dataclass(frozen=True)
class CheckpointQuantization:
    """What a checkpoint's quantization_config asks of each linear layer, by its checkpoint name."""
    quant_method: str
    rules: tuple[LayerRule, ...]
    ignore: tuple[str, ...] = ()
    quantizes_lm_head: bool = False

    def method_for(self, name: str) -> QuantMethod | None:
        if (name.split(".")[-1] == "lm_head" and not self.quantizes_lm_head) or \
                any(_matches(pattern, name) for pattern in self.ignore):
            return None
        for rule in self.rules:
            if any(target == "Linear" or _matches(target, name) for target in rule.targets):
                return rule.method
        return None


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def parse(quantization_config: dict) -> CheckpointQuantization:
    method = quantization_config.get("quant_method")
    if method == "fp8":
        return _fp8(quantization_config)
    if method == "compressed-tensors":
        return _compressed_tensors(quantization_config)
    if method in ("awq", "gptq"):
        return _int4(method, quantization_config)
    raise ValueError(f"the checkpoint's quantization_config has quant_method {method!r}; Serval reads "
                     f"{list(CHECKPOINT_FORMATS)} checkpoints (or quantizes a half-precision one with "
                     "quantization='fp8')")


def _fp8(config: dict) -> CheckpointQuantization:
    ignore = tuple(config.get("ignored_layers") or config.get("modules_to_not_convert") or ())
    block = config.get("weight_block_size")
    if not block:
        return CheckpointQuantization("fp8", (LayerRule(("Linear",), Fp8Method()),), ignore)
    block_n, block_k = (int(v) for v in block)
    if block_k < 16 or block_k & (block_k - 1) or block_n < 1:
        raise ValueError(f"block-wise fp8 checkpoints with weight_block_size {block} are not supported: the "
                         "column block must be a power of two of at least 16 (the published ones are [128, 128])")
    return CheckpointQuantization("fp8", (LayerRule(("Linear",), BlockFp8Method(block_n, block_k)),), ignore)


def _group_size(format_name: str, group_size) -> int:
    group_size = -1 if group_size in (None, -1) else int(group_size)
    if group_size != -1 and group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"{format_name} checkpoints with group_size {group_size} are not supported; Serval "
                         f"reads {list(SUPPORTED_GROUP_SIZES)} and -1 (per channel)")
    return group_size


def _int4(method: str, config: dict) -> CheckpointQuantization:
    bits = config.get("bits", config.get("w_bit"))
    if bits != 4:
        raise ValueError(f"{method} checkpoints with {bits} bits are not supported; Serval reads 4-bit ones")
    group_size = _group_size(method, config.get("group_size", config.get("q_group_size")))
    ignore = tuple(config.get("modules_to_not_convert") or ())
    if method == "awq":
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm" or not config.get("zero_point", True):
            raise ValueError(f"awq checkpoints in the {version!r} layout (zero_point "
                             f"{config.get('zero_point', True)}) are not supported; Serval reads 'gemm' with zeros")
        awq_ignore = tuple(f"re:.*{re.escape(module)}" for module in ignore)  # AWQ matches by substring
        return CheckpointQuantization("awq", (LayerRule(("Linear",), W4A16Method("awq", group_size)),), awq_ignore)
    checkpoint_format = config.get("checkpoint_format", "gptq")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"gptq checkpoints in checkpoint_format {checkpoint_format!r} are not supported; Serval "
                         "reads 'gptq' and 'gptq_v2'")
    offset = 1 if checkpoint_format == "gptq" else 0
    gptq = W4A16Method("gptq", group_size, symmetric=bool(config.get("sym", True)), zero_offset=offset)
    return CheckpointQuantization("gptq", (LayerRule(("Linear",), gptq),), ignore)


def _compressed_tensors(config: dict) -> CheckpointQuantization:
    top_format = config.get("format")
    rules = []
    for group_name, group in (config.get("config_groups") or {}).items():
        method = _compressed_tensors_method(group_name, group, group.get("format") or top_format)
        if method is not None:
            rules.append(LayerRule(tuple(group.get("targets") or ()), method))
    sparsity = config.get("sparsity_config") or {}
    if sparsity.get("format") not in (None, "dense"):
        raise ValueError(f"compressed-tensors sparsity format {sparsity.get('format')!r} is not supported")
    quantizes_lm_head = any(_matches(t, "lm_head") for rule in rules for t in rule.targets if t != "Linear")
    return CheckpointQuantization("compressed-tensors", tuple(rules), tuple(config.get("ignore") or ()),
                                  quantizes_lm_head)


def _compressed_tensors_method(group_name: str, group: dict, checkpoint_format: str | None) -> QuantMethod | None:
    weights = group.get("weights")
    if not weights:
        return None
    activations = group.get("input_activations")
    bits, kind, strategy = weights.get("num_bits"), weights.get("type"), weights.get("strategy")
    scheme = (f"compressed-tensors {group_name}: {bits}-bit {kind} weights, strategy {strategy!r}, format "
              f"{checkpoint_format!r}")
    if bits == 8 and kind == "float" and strategy in ("tensor", "channel"):
        return Fp8Method()
    if bits == 8 and kind == "int" and strategy in ("tensor", "channel") and activations:
        return Int8Method()
    if bits == 4 and kind == "int" and strategy in ("group", "channel") and checkpoint_format == "pack-quantized":
        if weights.get("actorder"):
            raise ValueError(f"{scheme}: actorder {weights['actorder']!r} is not supported")
        group_size = _group_size("compressed-tensors", weights.get("group_size") if strategy == "group" else -1)
        return W4A16Method("compressed-tensors", group_size, symmetric=bool(weights.get("symmetric", True)))
    raise ValueError(f"{scheme} is not supported; Serval reads FP8 W8A8 (tensor or channel), INT8 W8A8 (tensor or "
                     "channel) and W4A16 pack-quantized (group or channel)")
