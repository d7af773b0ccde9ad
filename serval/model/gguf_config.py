"""The model config a GGUF file's metadata describes, in Hugging Face's names.

For the Llama family (llama, qwen2, qwen3) it is a GGUFModelConfig: the fields Serval's model files read, with
transformers' defaults for what the file does not state. Building transformers' own LlamaConfig would import its
modeling utilities (torch.distributed.tensor, sympy): 1.2-1.5 s of the default model's start on this 2-core
machine, for a dozen numbers. `to_transformers()` gives the transformers config when a caller needs one (tests
compare the two). Gemma 3's config derives many fields (layer types, soft-capping, one rope per layer type), so
it stays transformers' Gemma3TextConfig; so do the mixtures of experts (Qwen3-MoE, and Mixtral, which llama.cpp
writes as a `llama` with `llama.expert_count`), whose routing options have no place in GGUFModelConfig.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

logger = logging.getLogger(__name__)

# GGUF architecture -> (HF architecture, transformers config class name, llama.cpp permuted Q/K rows).
# convert_hf_to_gguf.py permutes q_proj/k_proj rows only for LlamaModel (to llama.cpp's rotary layout);
# Qwen2Model and Qwen3Model are written unpermuted.
SUPPORTED_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", True),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", False),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", False),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", False),
    "qwen3moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", False),
}
# llama.cpp's constants for Gemma 3 (llama-model.cpp), which its GGUF files do not store: every sixth layer is
# global, the local layers' rope base is 10k, and queries are scaled by head_dim^-1/2 except in the 27B model
# (62 layers), which uses (hidden / heads)^-1/2.
_GEMMA3_SLIDING_WINDOW_PATTERN = 6
_GEMMA3_LOCAL_ROPE_BASE = 10000.0
_GEMMA3_27B_LAYERS = 62
# Tensors that describe the model rather than hold its weights (llama 3 writes its rope scaling as a tensor).
ROPE_FREQS = "rope_freqs.weight"


@dataclass
class GGUFModelConfig:
    """A Llama-family model's config from GGUF metadata (what LlamaConfig/Qwen2Config/Qwen3Config would hold)."""
    architectures: list[str]
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_parameters: dict[str, Any]  # transformers 5's spelling: rope_theta and rope_type included
    tie_word_embeddings: bool
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    attention_bias: bool = False
    hidden_act: str = "silu"
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    torch_dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_transformers(self):
        """The same config as transformers' class for this architecture."""
        import transformers

        class_name = next(name for hf_arch, name, _ in SUPPORTED_ARCHITECTURES.values()
                          if hf_arch == self.architectures[0])
        kwargs = {name: value for name, value in self.to_dict().items()
                  if name not in ("model_type", "rope_parameters", "sliding_window", "layer_types")}
        rope = dict(self.rope_parameters)
        kwargs["rope_theta"] = rope.pop("rope_theta")
        if rope.get("rope_type", "default") != "default":
            kwargs["rope_scaling"] = rope
        return getattr(transformers, class_name)(**kwargs)


def gguf_config(arch: str, meta: dict, tensor_shapes: dict[str, tuple[int, ...]],
                rope_freqs: Callable[[], np.ndarray] | None):
    """The config for GGUF architecture `arch`: `meta` its metadata, `tensor_shapes` each tensor's ggml shape,
    `rope_freqs` reads the llama 3 rope_freqs tensor when the file has one."""
    hf_arch, class_name, _ = SUPPORTED_ARCHITECTURES[arch]

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        # GGUF stores floats as float32: 1e-05 arrives as 9.999999747e-06. Round-trip through float32's str.
        return float(str(np.float32(value))) if isinstance(value, (float, np.floating)) else value

    vocab_size = int(tensor_shapes["token_embd.weight"][1])
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
        tie_word_embeddings="output.weight" not in tensor_shapes,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        torch_dtype="float32",
    )
    rope_theta = get("rope.freq_base", 10000.0)
    rope_scaling = _rope_scaling(get, rope_freqs, rope_theta, kwargs["head_dim"])
    if arch == "gemma3":
        import transformers

        kwargs.update(_gemma3_options(kwargs, get("attention.sliding_window")), rope_theta=rope_theta)
        if rope_scaling is not None:
            kwargs["rope_scaling"] = rope_scaling
        return getattr(transformers, class_name)(**kwargs)
    rope_parameters = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta}
    if arch == "qwen3moe" or (arch == "llama" and get("expert_count")):
        return _moe_config(arch, get, kwargs, rope_parameters)
    return GGUFModelConfig(model_type=arch, rope_parameters=rope_parameters,
                           attention_bias=arch == "qwen2" and "blk.0.attn_q.bias" in tensor_shapes, **kwargs)


def _moe_config(arch: str, get, kwargs: dict, rope_parameters: dict):
    """transformers' Qwen3MoeConfig or MixtralConfig. llama.cpp's qwen3moe has experts in every layer and always
    renormalizes the top-k weights (its graph has no dense layers and no norm_topk_prob switch), so the config
    says so whatever transformers' defaults are."""
    import transformers

    needed = ("expert_count", "expert_used_count") + (("expert_feed_forward_length",) if arch == "qwen3moe" else ())
    missing = [f"{arch}.{key}" for key in needed if not get(key)]
    if missing:
        raise ValueError(f"GGUF {arch} mixture of experts without {', '.join(missing)}: the file cannot say how its "
                         "experts are shaped or routed")
    num_experts, top_k = get("expert_count"), get("expert_used_count")
    if arch == "qwen3moe":
        expert_width = get("expert_feed_forward_length")
        return transformers.Qwen3MoeConfig(
            **(kwargs | {"intermediate_size": kwargs["intermediate_size"] or expert_width}),
            rope_parameters=rope_parameters, num_experts=num_experts, num_experts_per_tok=top_k,
            moe_intermediate_size=expert_width, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    return transformers.MixtralConfig(**(kwargs | {"architectures": ["MixtralForCausalLM"]}),
                                      rope_parameters=rope_parameters, num_local_experts=num_experts,
                                      num_experts_per_tok=top_k)


def _gemma3_options(kwargs: dict, sliding_window: int | None) -> dict:
    hidden_size, num_heads = kwargs["hidden_size"], kwargs["num_attention_heads"]
    is_27b = kwargs["num_hidden_layers"] == _GEMMA3_27B_LAYERS
    return dict(hidden_activation="gelu_pytorch_tanh", sliding_window=sliding_window,
                sliding_window_pattern=_GEMMA3_SLIDING_WINDOW_PATTERN, rope_local_base_freq=_GEMMA3_LOCAL_ROPE_BASE,
                query_pre_attn_scalar=hidden_size // num_heads if is_27b else kwargs["head_dim"])


def _rope_scaling(get, rope_freqs, theta: float, head_dim: int) -> dict | None:
    """HF rope_scaling from llama.cpp's rope.scaling.* keys, or from the llama3 rope_freqs tensor."""
    scaling_type = get("rope.scaling.type")
    factor = get("rope.scaling.factor") or get("rope.scale_linear")
    if rope_freqs is not None:
        return llama3_rope_scaling(torch.from_numpy(np.array(rope_freqs(), dtype=np.float32)), theta, head_dim)
    if scaling_type in (None, "none") and not factor:
        return None
    if scaling_type not in (None, "linear", "yarn"):
        raise ValueError(f"GGUF rope scaling type {scaling_type!r} is not supported; supported: linear, yarn")
    scaling = {"rope_type": scaling_type or "linear", "factor": float(factor)}
    if (original := get("rope.scaling.original_context_length")) is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def llama3_rope_scaling(divisors: torch.Tensor, theta: float, head_dim: int) -> dict:
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
