"""config.architectures[0] -> model class. One family file serves several architectures."""
from __future__ import annotations

import importlib

from torch import nn

# Architecture -> (module under serval.model, class). Imported on first use, as vLLM's registry does: a family file
# (and its kernels) loads only when a checkpoint needs it, and the family files may import the loader, which
# imports this, without a cycle.
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("llama", "Qwen3ForCausalLM"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("qwen_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen_moe", "Qwen3MoeForCausalLM"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3ForCausalLM"),
    "Phi3ForCausalLM": ("phi3", "Phi3ForCausalLM"),
    "GptOssForCausalLM": ("gpt_oss", "GptOssForCausalLM"),
    "DeepseekV3ForCausalLM": ("deepseek_v3", "DeepseekV3ForCausalLM"),
}
# For configs without `architectures` (some GGUF conversions): model_type names the family.
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                "qwen3_moe": "Qwen3MoeForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
                "gpt_oss": "GptOssForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}

# Pooling models (embedders without an LM head, cross-encoders with a score head): --runner pooling.
_POOLING_MODELS: dict[str, tuple[str, str]] = {
    "LlamaModel": ("pooling_model", "LlamaForEmbedding"),
    "MistralModel": ("pooling_model", "MistralForEmbedding"),
    "Qwen2Model": ("pooling_model", "Qwen2ForEmbedding"),
    "Qwen3Model": ("pooling_model", "Qwen3ForEmbedding"),
    "LlamaForSequenceClassification": ("pooling_model", "LlamaForSequenceClassification"),
    "Qwen2ForSequenceClassification": ("pooling_model", "Qwen2ForSequenceClassification"),
    "Qwen3ForSequenceClassification": ("pooling_model", "Qwen3ForSequenceClassification"),
}
# A causal LM served with --runner pooling: its decoder as an embedder (the LM head is dropped).
_CAUSAL_AS_EMBEDDING = {"LlamaForCausalLM": ("pooling_model", "LlamaForEmbedding"),
                        "MistralForCausalLM": ("pooling_model", "MistralForEmbedding"),
                        "Qwen2ForCausalLM": ("pooling_model", "Qwen2ForEmbedding"),
                        "Qwen3ForCausalLM": ("pooling_model", "Qwen3ForEmbedding")}


def _load(entry: tuple[str, str]) -> type[nn.Module]:
    module, name = entry
    return getattr(importlib.import_module(f"serval.model.{module}"), name)


SUPPORTED_ARCHITECTURES = tuple(_MODELS) + tuple(_POOLING_MODELS)


def architecture_of(config) -> str:
    architectures = getattr(config, "architectures", None)
    if architectures:
        return architectures[0]
    model_type = getattr(config, "model_type", None)
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    raise ValueError(f"config names no architecture (architectures={architectures!r}, model_type={model_type!r}); "
                     f"supported architectures: {list(SUPPORTED_ARCHITECTURES)}")


def resolve_runner(config, runner: str = "auto") -> str:
    """"generate" or "pooling": what `runner` asks for, or for "auto", what the architecture is (vLLM's --runner)."""
    if runner != "auto":
        return runner
    return "pooling" if architecture_of(config) in _POOLING_MODELS else "generate"


def get_model_class(config, runner: str = "auto") -> type[nn.Module]:
    architecture = architecture_of(config)
    runner = resolve_runner(config, runner)
    if runner == "pooling":
        entry = _POOLING_MODELS.get(architecture) or _CAUSAL_AS_EMBEDDING.get(architecture)
        if entry is None:
            raise ValueError(f"architecture {architecture!r} cannot run with runner='pooling'; pooling "
                             f"architectures: {list(_POOLING_MODELS) + list(_CAUSAL_AS_EMBEDDING)}")
        return _load(entry)
    if architecture in _POOLING_MODELS:
        raise ValueError(f"architecture {architecture!r} is a pooling model (embeddings, scores): it runs with "
                         "runner='pooling' (--runner pooling), not runner='generate'")
    if architecture not in _MODELS:
        raise ValueError(f"architecture {architecture!r} is not supported; "
                         f"supported architectures: {list(SUPPORTED_ARCHITECTURES)}")
    return _load(_MODELS[architecture])
