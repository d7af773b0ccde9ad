"""config.architectures[0] -> model class. One family file serves several architectures."""
from __future__ import annotations

from torch import nn

from serval.model.deepseek_v3 import DeepseekV3ForCausalLM
from serval.model.gemma3 import Gemma3ForCausalLM
from serval.model.gpt_oss import GptOssForCausalLM
from serval.model.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from serval.model.mixtral import MixtralForCausalLM
from serval.model.phi3 import Phi3ForCausalLM
from serval.model.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "GptOssForCausalLM": GptOssForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
}
# For configs without `architectures` (some GGUF conversions): model_type names the family.
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                "qwen3_moe": "Qwen3MoeForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
                "gpt_oss": "GptOssForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}

SUPPORTED_ARCHITECTURES = tuple(_MODELS)


def architecture_of(config) -> str:
    architectures = getattr(config, "architectures", None)
    if architectures:
        return architectures[0]
    model_type = getattr(config, "model_type", None)
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    raise ValueError(f"config names no architecture (architectures={architectures!r}, model_type={model_type!r}); "
                     f"supported architectures: {list(SUPPORTED_ARCHITECTURES)}")


def get_model_class(config) -> type[nn.Module]:
    architecture = architecture_of(config)
    if architecture not in _MODELS:
        raise ValueError(f"architecture {architecture!r} is not supported; "
                         f"supported architectures: {list(SUPPORTED_ARCHITECTURES)}")
    return _MODELS[architecture]
