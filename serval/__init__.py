"""Serval: LLM inference serving. The Python API uses vLLM's names.

Names load lazily so that `import serval.model.gguf` (say) doesn't pull in the whole engine.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "serval.llm",
    "SamplingParams": "serval.sampling_params",
    "AsyncEngine": "serval.engine.async_engine",
    "LLMEngine": "serval.engine.engine",
    "EngineConfig": "serval.config",
    "RequestOutput": "serval.outputs",
    "CompletionOutput": "serval.outputs",
    "Logprob": "serval.outputs",
    "PoolingParams": "serval.pooling_params",
    "PoolingRequestOutput": "serval.engine.pooling",
    "EmbeddingRequestOutput": "serval.engine.pooling",
    "ScoringRequestOutput": "serval.engine.pooling",
    "LoRARequest": "serval.lora.request",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'serval' has no attribute {name!r}")
