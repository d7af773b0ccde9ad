"""One rank's slices of a GGUF checkpoint: its rows or its input columns of each projection, cut from the
memory-mapped quantized blocks and dequantized, so that no rank reads or dequantizes another rank's part.

A GGUF tensor's data is [rows, row bytes]: each row (one output feature) is a run of blocks of 32 (Q4_0, Q4_1, Q8_0)
or 256 (the K-quants) input values, or plain F32/F16/BF16 values.

    column-parallel (q/k/v, gate/up, the vocabulary)   whole rows: any split is one; q/k rows that llama.cpp
                                                       permuted are unpermuted within the rank's own heads
    row-parallel (o_proj, down_proj)                   a range of every row's blocks: the rank's input columns
                                                       must start and end on block boundaries, else the start
                                                       is refused naming the tensor

Each rank dequantizes its slice (the packed CPU int4 and Triton GGUF kernels run on one device only for now).
Mixture-of-experts GGUFs stack every expert in one tensor and are refused.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from serval.layers.parallel import ShardLayout, TensorSlice, checkpoint_slice
from serval.layers.quant.gguf_blocks import Q, dequantize
# load_gguf's own naming and unpermuting, applied here to slices.
from serval.model.gguf import (EXPERT_STACK, LAYER_NAMES, LAYER_NAMES_BY_ARCHITECTURE, gguf_hf_name, read_model_header,
                               unpermute_rows, find_gguf_file)
from serval.model.gguf_config import ROPE_FREQS, SUPPORTED_ARCHITECTURES, gguf_config
from serval.model.gguf_reader import GGUFFile, GGUFTensor, read_gguf_file


def gguf_file_of(model_path: str, load_format: str) -> str | None:
    """The GGUF file a load reads (load_format "gguf", or "auto" where a .gguf is all there is), or None."""
    if load_format not in ("auto", "gguf"):
        return None
    file = find_gguf_file(model_path)
    if load_format == "gguf" and file is None:
        raise FileNotFoundError(f"load_format='gguf' but no .gguf file found at {model_path!r}")
    return file


def gguf_rank_config(file: str):
    """The model config the GGUF's metadata describes (as load_gguf builds it)."""
    gguf_file, metadata, arch = read_model_header(file)
    rope_freqs = gguf_file.tensors.get(ROPE_FREQS)
    return gguf_config(arch, metadata, {name: tensor.shape for name, tensor in gguf_file.tensors.items()},
                       (lambda: rope_freqs.data) if rope_freqs is not None else None)


def block_values(tensor: GGUFTensor) -> int:
    """Input values per block of the tensor's type (1 for plain types)."""
    import gguf
    qtype = Q(tensor.tensor_type)
    return 1 if qtype in (Q.F32, Q.F16, Q.BF16, Q.F64) else gguf.GGML_QUANT_SIZES[qtype][0]


def check_gguf_layout(file: str, layout: ShardLayout) -> None:
    """Raise ValueError for a GGUF tensor parallelism cannot split this way: experts stacked in one tensor, or a
    row-parallel shard whose input columns cut through the tensor's blocks (naming the tensor)."""
    gguf_file = read_gguf_file(file, decode_strings=False)
    for name, tensor in gguf_file.tensors.items():
        if EXPERT_STACK.fullmatch(name):
            raise ValueError(f"tensor parallelism does not shard GGUF mixture-of-experts checkpoints ({name} stacks "
                             "every expert in one tensor)")
        hf_name = gguf_hf_name(name, file, _layer_names(gguf_file)) if name != ROPE_FREQS else None
        piece = checkpoint_slice(hf_name, layout) if hf_name is not None else None
        if piece is None or piece.dim != 1:
            continue
        block = block_values(tensor)
        if piece.start % block or piece.length % block:
            raise ValueError(f"tensor_parallel_size={layout.size}: each rank's {piece.length} input columns of "
                             f"{hf_name} ({name}) cut through its {Q(tensor.tensor_type).name} blocks of {block} "
                             "values; a block's one scale cannot be split between ranks")


def iter_gguf_shard(file: str, layout: ShardLayout, config) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, the rank's slice, dequantized to float32) for every tensor of the GGUF, as load_weights takes
    them."""
    gguf_file = read_gguf_file(file, decode_strings=False)
    arch = gguf_file.metadata.get("general.architecture")
    permuted = SUPPORTED_ARCHITECTURES[arch][2]
    for name, tensor in gguf_file.tensors.items():
        if name == ROPE_FREQS:
            continue
        hf_name = gguf_hf_name(name, file, _layer_names(gguf_file))
        piece = checkpoint_slice(hf_name, layout)
        raw = tensor.data
        heads = None
        if permuted and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = config.num_attention_heads
        elif permuted and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = config.num_key_value_heads
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if piece is not None:
            raw, shape = _slice_raw(raw, shape, piece, block_values(tensor))
            if heads is not None:  # the rank's heads, each unpermuted within its own rows
                heads = layout.local_num_heads if hf_name.endswith(("q_proj.weight", "q_proj.bias")) else \
                    layout.local_num_kv_heads
        if heads is not None:
            raw = unpermute_rows(raw, heads)
        weight = dequantize(raw, tensor.tensor_type, shape)
        if arch == "gemma3" and hf_name.endswith("norm.weight"):
            weight -= 1  # llama.cpp stores Gemma's norms as 1 + w
        if piece is not None and piece.padded_length > piece.length:  # the last vocabulary slice's padding rows
            weight = torch.cat([weight, weight.new_zeros(piece.padded_length - piece.length, *weight.shape[1:])])
        yield hf_name, weight


def _slice_raw(raw: np.ndarray, shape: tuple[int, ...], piece: TensorSlice,
               block: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """The rank's rows (dim 0) or input columns (dim 1, whole blocks) of raw data, and their shape in values."""
    local_shape = list(shape)
    local_shape[piece.dim] = piece.length
    if piece.dim == 0:
        return raw[piece.start:piece.start + piece.length], tuple(local_shape)
    bytes_per_block = raw.shape[-1] // (shape[1] // block)
    first, count = piece.start // block * bytes_per_block, piece.length // block * bytes_per_block
    return raw[:, first:first + count], tuple(local_shape)


def _layer_names(gguf_file: GGUFFile) -> dict[str, str]:
    return LAYER_NAMES_BY_ARCHITECTURE.get(gguf_file.metadata.get("general.architecture"), LAYER_NAMES)
