"""GGUF checkpoints: read with gguf.GGUFReader, dequantize with numpy, rename to Hugging Face names and layout.

transformers can load a GGUF too, but takes ~20 s for SmolLM2-135M on a 2-core CPU; this module takes about a
second, so the default model starts fast. The result is a plain float32 state dict plus a transformers config,
the same thing the safetensors loader hands to the model.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass

import gguf
import numpy as np
import torch
import transformers

logger = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType

# GGUF architecture -> (config class, HF architecture name, llama.cpp permuted Q/K rows).
# convert_hf_to_gguf.py permutes q_proj/k_proj rows only for LlamaModel (to llama.cpp's rotary layout);
# Qwen2Model and Qwen3Model are written unpermuted.
SUPPORTED_ARCHITECTURES = {
    "llama": (transformers.LlamaConfig, "LlamaForCausalLM", True),
    "qwen2": (transformers.Qwen2Config, "Qwen2ForCausalLM", False),
    "qwen3": (transformers.Qwen3Config, "Qwen3ForCausalLM", False),
    "gemma3": (transformers.Gemma3TextConfig, "Gemma3ForCausalLM", False),
}

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma 3 has four norms per block: llama.cpp's ffn_norm is the one before the feed-forward block there, and its
# converter stores every Gemma norm as 1 + w (ggml scales by w), which load_gguf undoes.
_GEMMA3_LAYER_NAMES = _LAYER_NAMES | {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_LAYER_NAMES_BY_ARCHITECTURE = {"gemma3": _GEMMA3_LAYER_NAMES}
# llama.cpp's constants for Gemma 3 (llama-model.cpp), which its GGUF files do not store: every sixth layer is
# global, the local layers' rope base is 10k, and queries are scaled by head_dim^-1/2 except in the 27B model
# (62 layers), which uses (hidden / heads)^-1/2.
_GEMMA3_SLIDING_WINDOW_PATTERN = 6
_GEMMA3_LOCAL_ROPE_BASE = 10000.0
_GEMMA3_27B_LAYERS = 62
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Tensors that describe the model rather than hold its weights (llama 3 writes its rope scaling as a tensor).
_ROPE_FREQS = "rope_freqs.weight"


@dataclass
class GGUFCheckpoint:
    config: transformers.PretrainedConfig
    weights: dict[str, torch.Tensor]


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


class _Reader(gguf.GGUFReader):
    """GGUFReader on a plain ndarray view of its memmap.

    GGUFReader slices its buffer once per metadata string (~100k for a 49k-token vocabulary) and each np.memmap
    slice runs a Python __array_finalize__: that makes reading SmolLM2's header take ~3 s. The same slices of a
    plain ndarray take ~0.9 s. The view keeps the memmap alive through its base.
    """

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value


def read_gguf(path: str) -> gguf.GGUFReader:
    """A GGUFReader for the file (faster than the stock one on files with large vocabularies)."""
    return _Reader(path)


def load_gguf(path: str) -> GGUFCheckpoint:
    """The GGUF at `path` (a file, or a directory holding one) as a transformers config and float32 HF weights."""
    file = find_gguf_file(path)
    if file is None:
        raise FileNotFoundError(f"no GGUF file at {path!r}: pass a .gguf file or a directory holding exactly one")
    reader = read_gguf(file)
    metadata = {name: field.contents() for name, field in reader.fields.items()
                if not name.startswith("tokenizer.ggml.")}
    for key in ("tokens", "bos_token_id", "eos_token_id", "padding_token_id"):
        if (field := reader.fields.get(f"tokenizer.ggml.{key}")) is not None:
            metadata[f"tokenizer.ggml.{key}"] = len(field.data) if key == "tokens" else field.contents()
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF file {file!r} has architecture {arch!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    config = _config(arch, metadata, tensors)
    permuted = SUPPORTED_ARCHITECTURES[arch][2]
    layer_names = _LAYER_NAMES_BY_ARCHITECTURE.get(arch, _LAYER_NAMES)
    weights = {}
    for name, tensor in tensors.items():
        if name == _ROPE_FREQS:
            continue
        hf_name = _hf_name(name, file, layer_names)
        raw = tensor.data
        if permuted and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            raw = _unpermute_rows(raw, config.num_attention_heads)
        elif permuted and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            raw = _unpermute_rows(raw, config.num_key_value_heads)
        weights[hf_name] = dequantize(raw, tensor.tensor_type, tuple(int(d) for d in reversed(tensor.shape)))
        if arch == "gemma3" and hf_name.endswith("norm.weight"):
            weights[hf_name] -= 1
    return GGUFCheckpoint(config=config, weights=weights)


def _hf_name(name: str, file: str, layer_names: dict[str, str] = _LAYER_NAMES) -> str:
    stem, _, suffix = name.rpartition(".")
    if stem in _GLOBAL_NAMES and suffix in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    match = _LAYER_TENSOR.fullmatch(name)
    if match and match.group(2) in layer_names:
        return f"model.layers.{match.group(1)}.{layer_names[match.group(2)]}.{match.group(3)}"
    raise ValueError(f"GGUF file {file!r} has tensor {name!r}, which no supported architecture uses")


def _unpermute_rows(raw: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's permute(): rows (head, half, pair) back to HF's (head, pair, half).

    Quantization blocks never cross rows, so the rows of raw (quantized) data move before dequantization: fewer bytes.
    """
    rows = raw.shape[0]
    return raw.reshape(num_heads, rows // num_heads // 2, 2, *raw.shape[1:]).swapaxes(1, 2).reshape(raw.shape)


def _config(arch: str, meta: dict, tensors: dict) -> transformers.PretrainedConfig:
    config_cls, hf_arch, _ = SUPPORTED_ARCHITECTURES[arch]

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        # GGUF stores floats as float32: 1e-05 arrives as 9.999999747e-06. Round-trip through float32's str.
        return float(str(np.float32(value))) if isinstance(value, float) else value

    embed = tensors["token_embd.weight"]
    vocab_size = int(embed.shape[1])
    if meta.get("tokenizer.ggml.tokens", vocab_size) != vocab_size:
        logger.info("gguf vocabulary differs from embedding rows",
                    extra={"tokens": meta["tokenizer.ggml.tokens"], "embedding_rows": vocab_size})
    num_heads = get("attention.head_count")
    hidden_size = get("embedding_length")
    kwargs = dict(
        architectures=[hf_arch],
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=num_heads,
        num_key_value_heads=get("attention.head_count_kv", num_heads),
        head_dim=get("attention.key_length", hidden_size // num_heads),
        max_position_embeddings=get("context_length", 2048),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=get("rope.freq_base", 10000.0),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        torch_dtype="float32",
    )
    if arch == "qwen2":
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in tensors
    if arch == "gemma3":
        kwargs.update(_gemma3_options(kwargs, get("attention.sliding_window")))
    rope_scaling = _rope_scaling(get, tensors, kwargs)
    if rope_scaling is not None:
        kwargs["rope_scaling"] = rope_scaling
    return config_cls(**kwargs)


def _gemma3_options(kwargs: dict, sliding_window: int | None) -> dict:
    hidden_size, num_heads = kwargs["hidden_size"], kwargs["num_attention_heads"]
    is_27b = kwargs["num_hidden_layers"] == _GEMMA3_27B_LAYERS
    return dict(hidden_activation="gelu_pytorch_tanh", sliding_window=sliding_window,
                sliding_window_pattern=_GEMMA3_SLIDING_WINDOW_PATTERN, rope_local_base_freq=_GEMMA3_LOCAL_ROPE_BASE,
                query_pre_attn_scalar=hidden_size // num_heads if is_27b else kwargs["head_dim"])


def _rope_scaling(get, tensors: dict, kwargs: dict) -> dict | None:
    """HF rope_scaling from llama.cpp's rope.scaling.* keys, or from the llama3 rope_freqs tensor."""
    scaling_type = get("rope.scaling.type")
    factor = get("rope.scaling.factor") or get("rope.scale_linear")
    if _ROPE_FREQS in tensors:
        return _llama3_rope_scaling(torch.from_numpy(np.array(tensors[_ROPE_FREQS].data, dtype=np.float32)),
                                    kwargs["rope_theta"], kwargs["head_dim"])
    if scaling_type in (None, "none") and not factor:
        return None
    if scaling_type not in (None, "linear", "yarn"):
        raise ValueError(f"GGUF rope scaling type {scaling_type!r} is not supported; supported: linear, yarn")
    scaling = {"rope_type": scaling_type or "linear", "factor": float(factor)}
    if (original := get("rope.scaling.original_context_length")) is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _llama3_rope_scaling(divisors: torch.Tensor, theta: float, head_dim: int) -> dict:
    """HF llama3 rope parameters that reproduce llama.cpp's rope_freqs tensor (per-frequency divisors).

    The GGUF keeps only the divisors, not (factor, low/high_freq_factor, original context). Any parameters giving the
    same smoothing line s(1/wavelength) give the same frequencies, so fix low_freq_factor=1 and fit the line.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelength = 2 * math.pi / inv_freq
    divisors = divisors.double()
    factor = float(divisors.max())
    unscaled = divisors <= 1 + 1e-4
    scaled = divisors >= factor * (1 - 1e-4)
    smooth = ~(unscaled | scaled)
    if smooth.sum() >= 2:
        s = (1 / divisors[smooth] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit((1 / wavelength[smooth]).numpy(), s.numpy(), 1)
        # transformers wants an integer original context: round it, then move high_freq_factor to keep the slope.
        original = round(-slope / intercept)
        high = round(1 + original / slope, 6)
    elif smooth.sum() == 0:
        # No frequency is smoothed: put both boundaries in the gap between unscaled and scaled wavelengths.
        shortest_scaled = float(wavelength[scaled].min()) if scaled.any() else float(wavelength.max()) * 2
        longest_unscaled = float(wavelength[unscaled].max()) if unscaled.any() else float(wavelength.min()) / 2
        original = math.ceil(shortest_scaled) - 1
        if original <= longest_unscaled:
            raise ValueError("GGUF rope_freqs tensor: no integer original context fits its llama3 scaling")
        high = original / ((longest_unscaled + original) / 2)
    else:
        raise ValueError("GGUF rope_freqs tensor has a single smoothed frequency: its llama3 parameters are ambiguous")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": float(high),
            "original_max_position_embeddings": int(original)}


# --- dequantization -------------------------------------------------------------------------------------------------
# In numpy, not torch: numpy runs single-threaded, while torch's OpenMP threads spin at a barrier after each of the
# ~1,000 small ops a load makes. On this 2-core CPU shared with another torch process that made loading SmolLM2
# take 6-10 s instead of 0.3 s (measured); numpy takes ~0.3 s either way.

def dequantize(raw: np.ndarray, qtype: gguf.GGMLQuantizationType, shape) -> torch.Tensor:
    """The float32 tensor of `shape` (HF order, rows first) that the GGUF data `raw` encodes."""
    qtype = Q(qtype)
    shape = tuple(int(d) for d in shape)
    if qtype in (Q.F32, Q.F16, Q.F64):
        return torch.from_numpy(np.array(raw, dtype=np.float32).reshape(shape))
    data = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if qtype == Q.BF16:
        values = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif qtype in _DEQUANTIZERS:
        values = _DEQUANTIZERS[qtype](data.reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1]))
    else:
        try:
            values = gguf.quants.dequantize(data, qtype)
        except NotImplementedError as error:
            raise ValueError(f"GGUF tensor type {qtype.name} is not supported; supported: F32, F16, BF16, "
                             f"{', '.join(t.name for t in _DEQUANTIZERS)} and what gguf.quants dequantizes") from error
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(shape))


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 at byte `start` of each block, as a float32 column."""
    return blocks[:, start:start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """(..., n) bytes -> (..., 2n): low nibbles first, then high nibbles (ggml's order within a 32-group)."""
    out = np.empty((*packed.shape[:-1], 2, packed.shape[-1]), dtype=np.uint8)
    np.bitwise_and(packed, 0x0F, out=out[..., 0, :])
    np.right_shift(packed, 4, out=out[..., 1, :])
    return out.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    values = blocks[:, 2:].view(np.int8).astype(np.float32)
    values *= _f16(blocks, 0)
    return values


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    values = _nibbles(blocks[:, 2:]).astype(np.float32)
    values -= 8
    values *= _f16(blocks, 0)
    return values


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    values = _nibbles(blocks[:, 4:]).astype(np.float32)
    values *= _f16(blocks, 0)
    values += _f16(blocks, 2)
    return values


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins per super-block."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    sc, mn = _k_scales(blocks[:, 4:16])
    q = _nibbles(blocks[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).astype(np.float32)
    return (_f16(blocks, 0) * sc)[..., None] * q - (_f16(blocks, 2) * mn)[..., None]


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    sc, mn = _k_scales(blocks[:, 4:16])
    low = _nibbles(blocks[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    high = (blocks[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    q = (low | (high << 4)).astype(np.float32)
    return (_f16(blocks, 0) * sc)[..., None] * q - (_f16(blocks, 2) * mn)[..., None]


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    scale = (_f16(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32)).reshape(n, 16, 1)
    low = _nibbles(blocks[:, :128].reshape(n, 2, 64))  # (n, 2 halves, 128): 4 groups of 32 per half
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    high = ((blocks[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 2, 128)
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    return scale * q.reshape(n, 16, 16).astype(np.float32)


_DEQUANTIZERS = {Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}
