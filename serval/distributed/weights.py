"""One rank's shard of a model: built at the shard's sizes, filled from only its slices of the checkpoint.

safe_open's get_slice reads just the bytes of a slice from the memory-mapped file, so no rank materialises a
full projection it holds a part of (the replicated tensors, norms and row-parallel biases, are small).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from serval.layers.parallel import (ShardLayout, TensorSlice, checkpoint_slice, expert_checkpoint_slices,
                                    fused_checkpoint_parts, local_config, parallelize, parallelize_experts)
from serval.model import loader


def iter_safetensors_shard(files: list[str], layout: ShardLayout) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, the rank's slice of the tensor) for every tensor of the files, as load_weights takes them. A fused
    projection (Phi-3's qkv_proj, gate_up_proj) comes out as its parts (q_proj, ...), each already sliced."""
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
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


def load_rank_model(model_path: str, layout: ShardLayout, *, load_format: str, dtype: torch.dtype,
                    device: torch.device, seed: int, group: dist.ProcessGroup | None = None) -> nn.Module:
    """The rank's shard of the model at model_path (a safetensors checkpoint, or dummy weights), with its
    collectives on `group`. Dummy weights are the same on every rank for the tensors they share (the shapes,
    hence the generator's draws, are the same on every rank), but not tensor_parallel_size=1's."""
    if load_format not in ("auto", "safetensors", "dummy"):
        raise ValueError(f"tensor parallelism loads safetensors checkpoints or dummy weights; load_format="
                         f"{load_format!r} is not supported with it yet")
    hf_config = loader.load_config(model_path)
    if loader.checkpoint_quant(hf_config) is not None:
        raise ValueError("tensor parallelism does not shard quantized checkpoints yet "
                         f"({loader.checkpoint_quantization(hf_config)})")
    model = loader.build_model(local_config(hf_config, layout), dtype, device)
    if load_format == "dummy":
        loader.init_dummy_weights(model, seed)
    else:
        model.load_weights(iter_safetensors_shard(loader.safetensors_files(model_path), layout))
    return parallelize_experts(parallelize(model, layout, group), group)
