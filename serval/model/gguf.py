"""GGUF checkpoints: read the header (gguf_reader), rename tensors to Hugging Face names and layout, and either
dequantize every tensor to float32 or keep the projections in their blocks for the layer's GGUF format: on the CPU
the 4-bit types for torch's int4 kernel (PACK_CPU_INT4, serval.layers.quant.gguf), on the GPU every type the Triton
kernels read (PACK_TRITON, serval.layers.quant.gguf_triton).

transformers can load a GGUF too, but takes ~20 s for SmolLM2-135M on a 2-core CPU; this module takes a fraction
of a second, so the default model starts fast. The result is a state dict plus a config (gguf_config), the same
thing the safetensors loader hands to the model; with keep_packed, also the quantization of each packed layer,
as a checkpoint's quantization_config gives it (serval.layers.quant.gguf).
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from serval.layers.quant.gguf import ROW_MULTIPLE
from serval.layers.quant.gguf_blocks import INT4_TYPES, Q, dequantize  # noqa: F401 - dequantize: this module's API
from serval.layers.quant.gguf_q8 import fits_q8_head
from serval.model.gguf_config import (ROPE_FREQS, SUPPORTED_ARCHITECTURES, gguf_config,
                                      llama3_rope_scaling as _llama3_rope_scaling)  # noqa: F401 - tests use it
from serval.model.gguf_reader import GGUFFile, read_gguf_file

logger = logging.getLogger(__name__)

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",  # a mixture of experts' router
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma 3 has four norms per block: llama.cpp's ffn_norm is the one before the feed-forward block there, and its
# converter stores every Gemma norm as 1 + w (ggml scales by w), which load_gguf undoes.
_GEMMA3_LAYER_NAMES = LAYER_NAMES | {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
LAYER_NAMES_BY_ARCHITECTURE = {"gemma3": _GEMMA3_LAYER_NAMES}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# llama.cpp stacks each projection of a layer's experts in one tensor, [E, out, in] rows first (ggml's shape
# (in, out, E)): Qwen3-MoE, Mixtral. Each expert's slice reaches the model under its per-expert HF name.
EXPERT_STACK = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight")
# Projections the model merges into one layer (llama.py's qkv_proj, gate_up_proj): kept packed only together,
# since a merged layer has one format.
_MERGED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# The suffix under which a packed projection's raw blocks reach its layer's format.
PACKED_SUFFIX = "gguf_blocks"
# How load_gguf keeps projections packed: for torch's int4 CPU kernel, or as raw blocks for the Triton kernels.
PACK_CPU_INT4 = "cpu-int4"
PACK_TRITON = "triton"
PACKINGS = (PACK_CPU_INT4, PACK_TRITON)


@dataclass
class GGUFCheckpoint:
    config: Any  # GGUFModelConfig, or transformers' config for the families that need its derived fields
    weights: dict[str, torch.Tensor]
    quantization: Any = None  # serval.layers.quant.CheckpointQuantization of the packed layers, or None


def find_gguf_file(path: str) -> str | None:
    """The GGUF file `path` names: itself if a .gguf file, the only .gguf of a directory without safetensors."""
    if os.path.isfile(path):
        return path if path.endswith(".gguf") else None
    if not os.path.isdir(path):
        return None
    names = sorted(os.listdir(path))
    if any(name.endswith(".safetensors") for name in names):
        return None
    ggufs = [name for name in names if name.endswith(".gguf")]
    if len(ggufs) > 1:
        raise ValueError(f"model directory {path!r} holds several GGUF files {ggufs}: pass the path of one of them")
    return os.path.join(path, ggufs[0]) if ggufs else None


def read_gguf(path: str) -> GGUFFile:
    """The GGUF file's metadata and (memory-mapped) tensors."""
    return read_gguf_file(path)


def load_gguf(path: str, keep_packed: bool | str = False) -> GGUFCheckpoint:
    """The GGUF at `path` (a file, or a directory holding one) as a config and HF-named weights: float32, except
    with keep_packed, where each projection the packing takes stays as its raw blocks under
    `<module>.gguf_blocks` and `quantization` says its format. keep_packed: PACK_CPU_INT4 (or True): 4-bit types
    (Q4_0, Q4_1, Q4_K; all of a merged group alike); PACK_TRITON: every type in triton_gguf.SUPPORTED_TYPES."""
    packing = PACK_CPU_INT4 if keep_packed is True else keep_packed or None
    if packing is not None and packing not in PACKINGS:
        raise ValueError(f"keep_packed={keep_packed!r}: choose one of {list(PACKINGS)}")
    file = find_gguf_file(path)
    if file is None:
        raise FileNotFoundError(f"no GGUF file at {path!r}: pass a .gguf file or a directory holding exactly one")
    gguf_file, metadata, arch = read_model_header(file)
    tensors = gguf_file.tensors
    rope_freqs = tensors.get(ROPE_FREQS)
    config = gguf_config(arch, metadata, {name: tensor.shape for name, tensor in tensors.items()},
                         (lambda: rope_freqs.data) if rope_freqs is not None else None)
    permuted = SUPPORTED_ARCHITECTURES[arch][2]
    layer_names = LAYER_NAMES_BY_ARCHITECTURE.get(arch, LAYER_NAMES)
    expert_stacks = {name: match for name in tensors if (match := EXPERT_STACK.fullmatch(name))}
    hf_names = {name: gguf_hf_name(name, file, layer_names) for name in tensors
                if name != ROPE_FREQS and name not in expert_stacks}
    packed = _packed_projections(hf_names, tensors, packing) if packing else {}
    head = _packed_head(tensors) if packing == PACK_CPU_INT4 else None
    weights = {}
    for name, hf_name in hf_names.items():
        tensor = tensors[name]
        raw = tensor.data
        if name == head:
            weights[f"lm_head.{PACKED_SUFFIX}"] = torch.from_numpy(np.array(raw))
            continue
        if permuted and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            raw = unpermute_rows(raw, config.num_attention_heads)
        elif permuted and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            raw = unpermute_rows(raw, config.num_key_value_heads)
        if hf_name in packed:
            weights[f"{hf_name.removesuffix('.weight')}.{PACKED_SUFFIX}"] = torch.from_numpy(np.array(raw))
            continue
        weights[hf_name] = dequantize(raw, tensor.tensor_type, tuple(int(d) for d in reversed(tensor.shape)))
        if arch == "gemma3" and hf_name.endswith("norm.weight"):
            weights[hf_name] -= 1
    for name, match in expert_stacks.items():
        weights.update(_expert_weights(match, tensors[name]))
    return GGUFCheckpoint(config=config, weights=weights,
                          quantization=_packed_quantization(packed, packing, head is not None))


def dequantize_head(checkpoint: GGUFCheckpoint) -> dict[str, torch.Tensor]:
    """The checkpoint's weights with a packed LM head's table back in float32, for a model with no LM head to keep
    it (a pooling model): the embedding's weight when the head was tied to it, nothing otherwise."""
    weights = dict(checkpoint.weights)
    raw = weights.pop(f"lm_head.{PACKED_SUFFIX}", None)
    if raw is not None and checkpoint.config.tie_word_embeddings:
        shape = (checkpoint.config.vocab_size, checkpoint.config.hidden_size)
        weights["model.embed_tokens.weight"] = dequantize(raw.numpy(), Q.Q8_0, shape)
    return weights


def _expert_weights(match: re.Match, tensor) -> dict[str, torch.Tensor]:
    """Each expert's projection of a stacked expert tensor, as views of one dequantized tensor. Always float:
    the packed GGUF formats are for linear layers, and experts are not."""
    layer, projection = match.groups()
    stacked = dequantize(tensor.data, tensor.tensor_type, tuple(int(d) for d in reversed(tensor.shape)))
    return {f"model.layers.{layer}.mlp.experts.{expert}.{projection}_proj.weight": stacked[expert]
            for expert in range(stacked.shape[0])}


def _packed_projections(hf_names: dict[str, str], tensors: dict, packing: str = PACK_CPU_INT4) -> dict[str, Q]:
    """HF weight name -> GGUF type of each projection kept packed. PACK_CPU_INT4: a 4-bit type, shared by its
    merged group, of rows the int4 kernel takes (a merged group of such projections then fits too). PACK_TRITON:
    a type the kernels read, as is every type of its merged group (Q4_K_M files mix Q4_K and Q6_K in q/k/v)."""
    if packing == PACK_TRITON:
        from serval.kernels.triton_gguf import SUPPORTED_TYPES
        kept_types, row_multiple = SUPPORTED_TYPES, 1
    else:
        kept_types, row_multiple = INT4_TYPES, ROW_MULTIPLE
    name_of = {hf_name: name for name, hf_name in hf_names.items()}
    types = {hf_name: Q(tensors[name].tensor_type) for name, hf_name in hf_names.items()
             if hf_name.endswith("_proj.weight") and name.startswith("blk.")}
    packed = {}
    for hf_name, qtype in types.items():
        module = hf_name.removesuffix(".weight")
        parent, _, projection = module.rpartition(".")
        group = next((g for g in _MERGED_GROUPS if projection in g), (projection,))
        siblings = [types.get(f"{parent}.{member}.weight") for member in group]
        rows_fit = tensors[name_of[hf_name]].shape[1] % row_multiple == 0
        alike = all(sibling == qtype for sibling in siblings) or (
            packing == PACK_TRITON and all(sibling in kept_types for sibling in siblings))
        if qtype in kept_types and rows_fit and alike:
            packed[hf_name] = qtype
    return packed


def _packed_head(tensors: dict) -> str | None:
    """The GGUF tensor the LM head keeps 8-bit on the CPU (serval.layers.quant.gguf_q8), or None: `output`, or
    the embedding when the head is tied to it (no `output`), if that table is Q8_0 of a shape the format takes."""
    table = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if table is None or Q(table.tensor_type) != Q.Q8_0:
        return None
    columns, rows = (int(d) for d in table.shape)
    return table.name if fits_q8_head(rows, columns) else None


def _packed_quantization(packed: dict[str, Q], packing: str | None, head: bool = False):
    if not packed and not head:
        return None
    from serval.layers.quant.config import CheckpointQuantization, LayerRule
    from serval.layers.quant.gguf import GGUFInt4Method
    from serval.layers.quant.gguf_q8 import GGUFQ8HeadMethod
    from serval.layers.quant.gguf_triton import GGUFTritonMethod

    if packing != PACK_TRITON:
        rules = tuple(LayerRule((name.removesuffix(".weight"),), GGUFInt4Method(qtype.name))
                      for name, qtype in packed.items())
        if head:
            rules += (LayerRule(("lm_head",), GGUFQ8HeadMethod()),)
        return CheckpointQuantization("gguf", rules, quantizes_lm_head=head)
    rules = []
    for name, qtype in packed.items():
        parent, _, projection = name.removesuffix(".weight").rpartition(".")
        group = next((g for g in _MERGED_GROUPS if projection in g), (projection,))
        types = tuple((member.removesuffix("_proj"), packed[f"{parent}.{member}.weight"].name) for member in group)
        if len({t for _, t in types}) > 1:  # one object for every projection of the group: assign_formats checks
            method = GGUFTritonMethod("+".join(t for _, t in types), shard_types=types)
        else:
            method = GGUFTritonMethod(qtype.name)
        rules.append(LayerRule((name.removesuffix(".weight"),), method))
    rules = tuple(rules)
    return CheckpointQuantization("gguf", rules)


def read_model_header(file: str):
    """(the GGUF file, its metadata with the vocabulary replaced by its size, its architecture); ValueError for an
    architecture Serval does not load. The tokenizer reads the vocabulary, not the model."""
    gguf_file = read_gguf_file(file, decode_strings=False)
    metadata = dict(gguf_file.metadata)
    if (tokens := metadata.get("tokenizer.ggml.tokens")) is not None:
        metadata["tokenizer.ggml.tokens"] = len(tokens)
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF file {file!r} has architecture {arch!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
    return gguf_file, metadata, arch


def gguf_hf_name(name: str, file: str, layer_names: dict[str, str] = LAYER_NAMES) -> str:
    stem, _, suffix = name.rpartition(".")
    if stem in _GLOBAL_NAMES and suffix in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    match = _LAYER_TENSOR.fullmatch(name)
    if match and match.group(2) in layer_names:
        return f"model.layers.{match.group(1)}.{layer_names[match.group(2)]}.{match.group(3)}"
    raise ValueError(f"GGUF file {file!r} has tensor {name!r}, which no supported architecture uses")


def unpermute_rows(raw: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's permute(): rows (head, half, pair) back to HF's (head, pair, half).

    Quantization blocks never cross rows, so the rows of raw (quantized) data move before dequantization: fewer bytes.
    """
    rows = raw.shape[0]
    return raw.reshape(num_heads, rows // num_heads // 2, 2, *raw.shape[1:]).swapaxes(1, 2).reshape(raw.shape)
