"""load_model: a checkpoint directory (safetensors), a GGUF file, or a config.json alone (dummy weights) -> model.

The model is built directly in the requested dtype on the requested device, then filled from the checkpoint one
tensor at a time: safetensors shards are memory-mapped and each tensor is read once, straight into its parameter.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Iterator

import torch
import transformers
from safetensors import safe_open
from torch import nn

from serval.config import QUANTIZATIONS
from serval.layers.linear import Linear
from serval.model.default_model import MODEL_ALIASES, resolve_model
from serval.model import registry  # the module: the registry imports the family files, some of which import us

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# vLLM's dummy loader range: small enough that activations stay finite through any depth, in any dtype.
DUMMY_WEIGHT_RANGE = (-1e-3, 1e-3)


def load_model(model: str, *, load_format: str = "auto", dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", seed: int = 0,
               quantization: str | None = None) -> tuple[nn.Module, transformers.PretrainedConfig]:
    """Build and load the model at `model` (a directory, a GGUF file, or a packaged model's alias such as
    "gemma3-270m"); return (model in eval mode, HF config).
    quantization="fp8": the decoder's projections are quantized to float8 once loaded (quantize_fp8). A checkpoint
    whose config.json declares fp8 (checkpoint_quantization) is read in float8 as it is, with or without it."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r} is not supported; choose one of {list(LOAD_FORMATS)}")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is not supported; choose one of {list(QUANTIZATIONS)}")
    model = resolve_model(model)
    if not os.path.exists(model):
        raise FileNotFoundError(f"model path {model!r} does not exist (packaged models by name: "
                                f"{list(MODEL_ALIASES)})")
    start = time.perf_counter()
    gguf_file = _find_gguf_file(model) if load_format in ("auto", "gguf") else None
    if load_format == "gguf" and gguf_file is None:
        raise FileNotFoundError(f"load_format='gguf' but no .gguf file found at {model!r}")
    if gguf_file is not None:
        from serval.model.gguf import load_gguf
        checkpoint = load_gguf(gguf_file)
        config, weights = checkpoint.config, iter(checkpoint.weights.items())
        load_format = "gguf"
    else:
        config = load_config(model)
        weights = None if load_format == "dummy" else iter_safetensors(safetensors_files(model))
        load_format = "dummy" if load_format == "dummy" else "safetensors"
    net = build_model(config, dtype, device)
    # A checkpoint saved in float8 is loaded as it is (and asks for no quantization=); dummy weights for its
    # config are quantized like any half-precision ones.
    declared = checkpoint_quantization(config)
    quantization = quantization or declared
    from_float8 = weights is not None and declared == "fp8"
    if from_float8:
        for module in fp8_projections(net):
            module.empty_fp8_()
    if weights is None:
        init_dummy_weights(net, seed)
    else:
        net.load_weights(weights)
    if quantization == "fp8" and not from_float8:
        quantize_fp8(net)
    logger.info("model loaded", extra={"model": model, "load_format": load_format, "dtype": str(dtype),
                                       "quantization": quantization,
                                       "device": str(device), "seconds": round(time.perf_counter() - start, 3)})
    return net, config


def checkpoint_quantization(config: transformers.PretrainedConfig) -> str | None:
    """The quantization a checkpoint's config.json declares (its quantization_config): None, or "fp8" for
    vLLM's/transformers' fp8 format (float8 e4m3 `weight` with a per-tensor or per-channel `weight_scale` beside
    it). Static activation scales (`input_scale`) are not used: activations are quantized per token instead."""
    quantization_config = getattr(config, "quantization_config", None)
    if not quantization_config:
        return None
    if not isinstance(quantization_config, dict):
        quantization_config = quantization_config.to_dict()
    method = quantization_config.get("quant_method")
    if method != "fp8":
        raise ValueError(f"the checkpoint's quantization_config has quant_method {method!r}; Serval reads 'fp8' "
                         "checkpoints (or quantizes a half-precision one with quantization='fp8')")
    if quantization_config.get("weight_block_size"):
        raise ValueError("block-wise fp8 checkpoints (quantization_config.weight_block_size "
                         f"{quantization_config['weight_block_size']}) are not supported; per-tensor and "
                         "per-channel weight scales are")
    return "fp8"


def fp8_projections(model: nn.Module) -> list[Linear]:
    """The layers fp8 applies to: every projection of the decoder layers. The embedding and the LM head stay in
    the model's dtype, as vLLM's fp8 leaves them: they are the most sensitive to rounding and the head's logits
    are the output."""
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or name.split(".")[-1] == "lm_head":
            continue
        if module.in_features % 16 or module.out_features % 16:
            # The float8 GEMM (cuBLASLt) takes only multiples of 16.
            raise ValueError(f"quantization='fp8' needs projections whose sizes are multiples of 16; {name} is "
                             f"{module.out_features} x {module.in_features}")
        layers.append(module)
    return layers


def quantize_fp8(model: nn.Module) -> None:
    """Every fp8 projection to float8 with per-channel scales, layer by layer (the half-precision copy of one
    layer at a time is the only extra memory)."""
    for module in fp8_projections(model):
        module.quantize_fp8_()


def load_config(model_dir: str) -> transformers.PretrainedConfig:
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"no config.json in {model_dir!r}; a safetensors or dummy load needs one")
    return transformers.AutoConfig.from_pretrained(model_dir)


def build_model(config: transformers.PretrainedConfig, dtype: torch.dtype, device: str | torch.device) -> nn.Module:
    """The model for config.architectures[0], parameters allocated (not initialized) in dtype on device."""
    model_class = registry.get_model_class(config)
    with torch.device(device), _default_dtype(dtype):
        model = model_class(config)
    return model.eval().requires_grad_(False)


def safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint's .safetensors files: the one model.safetensors, or the shards its index lists."""
    index_path = os.path.join(model_dir, SAFETENSORS_INDEX)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(model_dir, shard) for shard in shards]
        missing = [path for path in files if not os.path.isfile(path)]
        if missing:
            raise FileNotFoundError(f"{index_path} lists shards that are not there: {missing}")
        return files
    single = os.path.join(model_dir, SAFETENSORS_FILE)
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(
        f"no weights in {model_dir!r}: expected {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} (or a .gguf file); "
        f"found {sorted(os.listdir(model_dir))}. Use load_format='dummy' for random weights.")


def iter_safetensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the files, each read from the memory map once, when asked for."""
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Fill every parameter with uniform values in DUMMY_WEIGHT_RANGE, deterministically from seed."""
    low, high = DUMMY_WEIGHT_RANGE
    generators: dict[torch.device, torch.Generator] = {}
    for _, param in sorted(model.named_parameters()):
        if param.device not in generators:
            generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        param.data.uniform_(low, high, generator=generators[param.device])


def _find_gguf_file(model: str) -> str | None:
    from serval.model.gguf import find_gguf_file  # imported here: the gguf reader is only needed for GGUF files
    return find_gguf_file(model)


# Mixture-of-experts checkpoints name each expert's projections (Mixtral: w1 gate, w3 up, w2 down; Qwen:
# gate_proj, up_proj, down_proj), or, as transformers 5 saves with save_original_format=False, stack them:
# experts.gate_up_proj [E, 2I, H] (gate rows first) and experts.down_proj [E, H, I].
_PER_EXPERT = re.compile(r"^(?P<block>.+)\.(?:block_sparse_moe|mlp)\.experts\.(?P<expert>\d+)\."
                         r"(?P<projection>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_STACKED_EXPERTS = re.compile(r"^(?P<block>.+)\.(?:block_sparse_moe|mlp)\.experts\.(?P<stack>gate_up_proj|down_proj)$")
_PROJECTIONS = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


@dataclass
class ExpertSlice:
    """One expert's projection in a checkpoint, and the stacked parameter it belongs to."""
    checkpoint_name: str  # as the checkpoint names it (for a stacked tensor, its name plus the expert)
    name: str  # our stacked parameter: <layer>.mlp.experts.gate_up_proj or .down_proj
    expert: int
    projection: str  # "gate", "up" or "down"
    tensor: torch.Tensor  # [I, H] for gate/up, [H, I] for down


def expert_weight_slices(hf_name: str, tensor: torch.Tensor) -> list[ExpertSlice] | None:
    """The expert projections a checkpoint tensor holds (views, nothing copied), or None if it holds none."""
    match = _PER_EXPERT.match(hf_name)
    if match:
        projection = _PROJECTIONS[match["projection"]]
        stack = "down_proj" if projection == "down" else "gate_up_proj"
        return [ExpertSlice(hf_name, f"{match['block']}.mlp.experts.{stack}", int(match["expert"]), projection,
                            tensor)]
    match = _STACKED_EXPERTS.match(hf_name)
    if not match:
        return None
    name = f"{match['block']}.mlp.experts.{match['stack']}"
    if tensor.dim() != 3:
        raise ValueError(f"weight {hf_name!r} has shape {tuple(tensor.shape)}; stacked experts are 3-D [E, out, in]")
    if match["stack"] == "down_proj":
        return [ExpertSlice(f"{hf_name}[{e}]", name, e, "down", tensor[e]) for e in range(len(tensor))]
    if tensor.shape[1] % 2:
        raise ValueError(f"weight {hf_name!r} has shape {tuple(tensor.shape)}: gate_up_proj stacks gate and up "
                         "rows, so its second dimension must be even")
    gate, up = tensor.chunk(2, dim=1)
    return [ExpertSlice(f"{hf_name}[{e}]", name, e, projection, part[e])
            for e in range(len(tensor)) for projection, part in (("gate", gate), ("up", up))]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    # Parameters are created in the target dtype rather than cast after: no float32 copy of the model ever exists.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
