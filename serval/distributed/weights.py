"""One rank's shard of a model: built at the shard's sizes, filled from only its slices of the checkpoint.

safe_open's get_slice reads just the bytes of a slice from the memory-mapped file, so no rank materialises a
full projection it holds a part of (the replicated tensors, norms and row-parallel biases, are small).
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from serval.layers.parallel import (MOE_TENSOR_PARALLEL_ARCHITECTURES, ROW_PARALLEL_PROJECTIONS, ShardLayout,
                                    TensorSlice, checkpoint_slice, expert_checkpoint_slices, fused_checkpoint_parts,
                                    local_config, parallelize, parallelize_experts, with_weight_blocks)
from serval.layers.mlp import GatedMLP
from serval.layers.moe import FusedMoE
from serval.distributed.gguf_shards import gguf_file_of, gguf_rank_config, iter_gguf_shard
from serval.distributed.quant_shards import (QuantizedSharding, check_quantized_layout, quantized_read,
                                             quantized_sharding)
from serval.layers.quant.fp8 import BlockFp8Method
from serval.layers.quant.kv_scales import parse_kv_scale_name, take_kv_scales
from serval.layers.quant.w4a16 import W4A16Method
from serval.model import loader

# Checkpoints that store q/k/v or gate/up as one tensor: sliced part by part, which only block fp8's row-wise
# layout allows (the 4-bit formats pack along the rows or transpose them).
FUSED_CHECKPOINT_ARCHITECTURES = ("Phi3ForCausalLM",)


def iter_safetensors_shard(files: list[str], layout: ShardLayout,
                           sharding: QuantizedSharding | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, the rank's slice of the tensor) for every tensor of the files, as load_weights takes them. A fused
    projection (Phi-3's qkv_proj, gate_up_proj) comes out as its parts (q_proj, ...), each already sliced. A
    quantized checkpoint's own tensors (packed words, group scales) are sliced in their layouts (quant_shards)."""
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                if parse_kv_scale_name(name) is not None:
                    # One number per layer (k_proj.k_scale would otherwise be cut like k_proj's rows): every rank
                    # takes it whole for its own heads.
                    yield name, f.get_tensor(name)
                    continue
                if sharding is not None and (read := quantized_read(name, layout, sharding,
                                                                    f.get_slice(name).get_shape())) is not None:
                    yield name, read.finish(read_slices(f.get_slice(name), read.pieces) if read.pieces
                                            else f.get_tensor(name))
                    continue
                if layout.expert_parallel and (owned := owned_expert_tensor(name, layout)) is not None:
                    if owned.hf_name is not None:  # None: another rank's expert
                        yield owned.hf_name, (read_slices(f.get_slice(name), owned.pieces) if owned.pieces
                                              else f.get_tensor(name))
                    continue
                if (expert_pieces := expert_checkpoint_slices(name, layout)) is not None:
                    yield name, read_slices(f.get_slice(name), expert_pieces)
                    continue
                fused = fused_checkpoint_parts(name, layout)
                if fused is not None:
                    for part in fused:
                        yield part.hf_name, _read_slice(f, name, part.piece)
                    continue
                piece = checkpoint_slice(name, layout)
                yield name, f.get_tensor(name) if piece is None else _read_slice(f, name, piece)


@dataclass(frozen=True)
class OwnedExpertTensor:
    """An expert tensor as an expert-parallel rank loads it: under its local expert numbering, and the pieces of
    it that are the rank's (none: all of it). hf_name None: a tensor of another rank's expert, not read."""
    hf_name: str | None
    pieces: list[TensorSlice]


_PER_EXPERT = re.compile(r"\.experts\.(?P<expert>\d+)\.")
_STACKED_EXPERTS = re.compile(r"\.experts\.(?:gate_up_proj|down_proj)(?:_bias|_blocks|_scales)?$")


def owned_expert_tensor(hf_name: str, layout: ShardLayout) -> OwnedExpertTensor | None:
    """With expert parallelism: how rank layout.rank loads a routed expert's tensor (experts [first, first + E/N)
    renumbered from 0; of the stacked ones, those rows of dim 0); None for any other tensor."""
    first, count = layout.first_expert, layout.local_num_experts
    if match := _PER_EXPERT.search(hf_name):
        expert = int(match["expert"])
        if not first <= expert < first + count:
            return OwnedExpertTensor(None, [])
        start, end = match.span()
        return OwnedExpertTensor(f"{hf_name[:start]}.experts.{expert - first}.{hf_name[end:]}", [])
    if _STACKED_EXPERTS.search(hf_name):
        return OwnedExpertTensor(hf_name, [TensorSlice(0, first, count, count)])
    return None


def widen_routers(model: nn.Module, layout: ShardLayout) -> None:
    """With expert parallelism the rank's model is built with its E/N experts, which also narrowed the routers
    (a MoE block's `gate`, gpt-oss's `router`): give them back all E outputs, since every rank routes alike."""
    for module in model.modules():
        if not isinstance(getattr(module, "experts", None), FusedMoE):
            continue
        for name in ("gate", "router"):
            router = getattr(module, name, None)
            if isinstance(router, nn.Linear) and router.out_features != layout.num_experts:
                setattr(module, name, nn.Linear(router.in_features, layout.num_experts, bias=router.bias is not None,
                                                device=router.weight.device, dtype=router.weight.dtype))
            elif hasattr(router, "config") and router.weight.shape[0] != layout.num_experts:
                # DeepSeek-V3's router, built from its config: the same with every expert (and its groups) back.
                config = copy.copy(router.config)
                config.n_routed_experts = layout.num_experts
                setattr(module, name, type(router)(config).to(router.weight.device))


def narrow_shared_experts(model: nn.Module, layout: ShardLayout) -> None:
    """With expert parallelism DeepSeek-V3's shared experts were built at their whole width (their width follows
    moe_intermediate_size, kept whole for the routed experts): rebuild them at 1/N of it, split by rows as under
    tensor parallelism."""
    for module in model.modules():
        shared = getattr(module, "shared_experts", None)
        if not isinstance(shared, GatedMLP):
            continue
        width = layout.shared_expert_intermediate_size // layout.size
        if shared.down_proj.in_features != width:
            weight = shared.down_proj.weight
            narrowed = GatedMLP(shared.down_proj.out_features, width, "silu").to(weight.device, weight.dtype)
            narrowed.act_and_mul = shared.act_and_mul
            module.shared_experts = narrowed


def _read_slice(f, name: str, piece: TensorSlice) -> torch.Tensor:
    tensor = read_slices(f.get_slice(name), [piece])
    if piece.padded_length > piece.length:  # the last vocabulary slice: rows no token id reaches
        padding = list(tensor.shape)
        padding[piece.dim] = piece.padded_length - piece.length
        tensor = torch.cat([tensor, tensor.new_zeros(padding)], dim=piece.dim)
    return tensor


def read_slices(part, pieces: list[TensorSlice]) -> torch.Tensor:
    """The pieces of a safetensors slice handle, read one by one and concatenated along their (common) dim."""
    tensors = []
    for piece in pieces:
        index = [slice(None)] * len(part.get_shape())
        index[piece.dim] = slice(piece.start, piece.start + piece.length)
        tensors.append(part[tuple(index)])
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=pieces[0].dim)


def rank_config(model_path: str, load_format: str, hf_overrides: dict | None = None):
    """The config of the model at model_path: a GGUF's metadata (load_format "gguf", or "auto" with only a .gguf
    there), else config.json; hf_overrides applied (loader.apply_hf_overrides)."""
    gguf_file = gguf_file_of(model_path, load_format)
    config = gguf_rank_config(gguf_file) if gguf_file is not None else loader.load_config(model_path)
    loader.apply_hf_overrides(config, hf_overrides)
    return config


def check_quantization(hf_config, quantization: str | None) -> None:
    """Raise ValueError for a quantized checkpoint or a quantization tensor parallelism does not shard: it shards
    quantization="fp8" (each rank quantizes its own slice) and the checkpoint formats Serval reads (block and
    per-channel fp8, compressed-tensors FP8/INT8/W4A16, AWQ, GPTQ) of the dense families; Phi-3's fused
    projections in block fp8 only. Mixture-of-experts checkpoints are refused: one device does not read their
    experts quantized either."""
    declared = loader.checkpoint_quant(hf_config)
    if declared is None:
        return
    if quantization is not None:
        raise ValueError(f"quantization={quantization!r} on a checkpoint already quantized "
                         f"({declared.quant_method}): leave quantization unset")
    methods = {rule.method for rule in declared.rules}
    architecture = (getattr(hf_config, "architectures", None) or [""])[0]
    if architecture in MOE_TENSOR_PARALLEL_ARCHITECTURES:
        raise ValueError(f"tensor parallelism does not shard quantized {architecture} checkpoints "
                         f"({declared.quant_method}): their experts are not read in that format on one device "
                         "either")
    if architecture in FUSED_CHECKPOINT_ARCHITECTURES and \
            not all(isinstance(method, BlockFp8Method) for method in methods):
        raise ValueError(f"tensor parallelism does not shard {architecture}'s fused qkv_proj/gate_up_proj in "
                         f"{declared.quant_method} ({', '.join(sorted(method.name for method in methods))}): "
                         "their packed layout cannot be cut part by part; block-fp8 and half-precision "
                         "checkpoints of it are sharded")


def quantized_layout(layout: ShardLayout, hf_config) -> ShardLayout:
    """The layout with a block-fp8 checkpoint's blocks; raises ValueError when a format's blocks, words or groups
    straddle ranks (naming the projection). Unchanged for any other checkpoint."""
    declared = loader.checkpoint_quant(hf_config)
    if declared is None:
        return layout
    for rule in declared.rules:
        if isinstance(rule.method, BlockFp8Method):
            layout = with_weight_blocks(layout, rule.method.block_n, rule.method.block_k)
        check_quantized_layout(layout, rule.method)
    return layout


def hold_every_group(model: nn.Module, formats: loader.LayerFormats, layout: ShardLayout) -> None:
    """GPTQ with act-order: each row-parallel shard keeps every group's scales and zero points (quant_shards)."""
    for name, module in model.named_modules():
        method = formats.layers.get(module)
        if isinstance(method, W4A16Method) and name.rpartition(".")[2] in ROW_PARALLEL_PROJECTIONS:
            method.hold_every_group(module, method.groups(module.in_features) * layout.size)


def load_rank_model(model_path: str, layout: ShardLayout, *, load_format: str, dtype: torch.dtype,
                    device: torch.device, seed: int, group: dist.ProcessGroup | None = None,
                    quantization: str | None = None, hf_overrides: dict | None = None) -> nn.Module:
    """The rank's shard of the model at model_path (a safetensors checkpoint, a GGUF, or dummy weights), with its
    collectives on `group`. Dummy weights are the same on every rank for the tensors they share (the shapes,
    hence the generator's draws, are the same on every rank), but not tensor_parallel_size=1's.
    quantization="fp8": each rank quantizes its own slices once loaded (a column-parallel shard's rows keep one
    device's scales; a row-parallel shard's rows get scales over its columns). A block-fp8 checkpoint's blocks
    are read as they are, each rank its own. A float8 KV cache's per-layer scales (k_scale, v_scale) are the same
    on every rank: one number per layer, applied to whichever heads the rank holds."""
    gguf_file = gguf_file_of(model_path, load_format)
    hf_config = rank_config(model_path, load_format, hf_overrides)
    check_quantization(hf_config, quantization)
    layout = quantized_layout(layout, hf_config)
    model = loader.build_model(local_config(hf_config, layout), dtype, device)
    if layout.expert_parallel:
        widen_routers(model, layout)
        narrow_shared_experts(model, layout)
    declared = loader.checkpoint_quant(hf_config)
    formats = loader.assign_formats(model, declared) if declared is not None else loader.LayerFormats({}, {})
    if gguf_file is not None:
        model.load_weights(iter_gguf_shard(gguf_file, layout, hf_config))
    elif load_format == "dummy":
        loader.init_dummy_weights(model, seed)
        for module, method in formats.layers.items():  # as a checkpoint would hold them
            module.quantize_(method)
    else:
        for module, method in formats.layers.items():
            module.set_quant_method(method)
        sharding = quantized_sharding(hf_config, declared)
        if sharding is not None and sharding.act_order:
            hold_every_group(model, formats, layout)
        weights = iter_safetensors_shard(loader.safetensors_files(model_path), layout, sharding)
        # A float8 KV cache's per-layer scales go to the attention layers, as on one device.
        model.load_weights(loader.route_to_formats(take_kv_scales(model, weights), formats.routes))
        for name, module in model.named_modules():
            if module in formats.layers:
                module.quant_method.finish(module, name)
    if quantization == "fp8":
        loader.quantize_fp8(model)
    return parallelize_experts(parallelize(model, layout, group), group, layout)
