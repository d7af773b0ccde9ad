"""load_model: a checkpoint directory (safetensors), a GGUF file, or a config.json alone (dummy weights) -> model.

The model is built directly in the requested dtype on the requested device, then filled from the checkpoint one
tensor at a time: safetensors shards are memory-mapped and each tensor is read once, straight into its parameter.

A quantized checkpoint (config.json's quantization_config: fp8, block fp8, compressed-tensors, awq, gptq; see
serval.layers.quant.config) gives each linear layer its format before loading. The model's load_weights copies
the tensors it knows (`weight`, `weight_scale`, biases); the tensors only the format knows (packed 4-bit words,
block scales, zero points) go straight to the layer's format, so model files never learn which one runs.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import transformers
from safetensors import safe_open
from torch import nn

from serval.layers.quant.kv_scales import take_kv_scales
from serval.config import QUANTIZATIONS
from serval.layers import quant
from serval.layers.embedding import Embedding
from serval.layers.linear import Linear
from serval.layers.moe import FusedMoE
from serval.model.default_model import MODEL_ALIASES, resolve_model
from serval.model import registry  # the module: the registry imports the family files, some of which import us

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Formats a model file dequantizes itself at load (gpt-oss's MXFP4 experts), which the linear layers never see.
MODEL_DEQUANTIZED_FORMATS = ("mxfp4",)
# vLLM's dummy loader range: small enough that activations stay finite through any depth, in any dtype.
DUMMY_WEIGHT_RANGE = (-1e-3, 1e-3)
GGUF_DEQUANTIZE_ENV = "SERVAL_GGUF_DEQUANTIZE"
GGUF_KERNEL_ENV = "SERVAL_GGUF"  # "triton": the Triton GGUF kernels on any device (the interpreter on the CPU)


def load_model(model: str, *, load_format: str = "auto", dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", seed: int = 0,
               quantization: str | None = None,
               runner: str = "auto", hf_overrides: dict | None = None) -> tuple[nn.Module, transformers.PretrainedConfig]:
    """Build and load the model at `model` (a directory, a GGUF file, or a packaged model's alias such as
    "gemma3-270m"); return (model in eval mode, HF config).
    quantization="fp8": the decoder's projections are quantized to float8 once loaded (quantize_fp8). A checkpoint
    whose config.json declares fp8 (checkpoint_quantization) is read in float8 as it is, with or without it.
    hf_overrides: config fields replaced before the model is built (apply_hf_overrides)."""
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
        checkpoint = load_gguf(gguf_file, keep_packed=gguf_packing(device, quantization))
        config, weights = checkpoint.config, iter(checkpoint.weights.items())
        load_format = "gguf"
    else:
        config = load_config(model)
        weights = None if load_format == "dummy" else iter_safetensors(safetensors_files(model))
        load_format = "dummy" if load_format == "dummy" else "safetensors"
    apply_hf_overrides(config, hf_overrides)
    net = build_model(config, dtype, device, runner)
    declared = checkpoint_quant(config)
    if gguf_file is not None and checkpoint.quantization is not None:
        declared = checkpoint.quantization  # the 4-bit projections a GGUF keeps packed (serval.layers.quant.gguf)
        if declared.quantizes_lm_head and not isinstance(getattr(net, "lm_head", None), Linear):
            from serval.model.gguf import dequantize_head
            weights = iter(dequantize_head(checkpoint).items())  # a pooling model: no head to keep the table in
    if quantization == "fp8" and declared is not None and \
            any(rule.method != quant.Fp8Method() for rule in declared.rules):
        raise ValueError(f"quantization='fp8' asks for per-channel fp8, but the checkpoint is already quantized "
                         f"({declared.quant_method}: {', '.join(rule.method.name for rule in declared.rules)}); "
                         "mixed formats are not supported: leave quantization unset")
    if weights is None:
        # Dummy weights for a quantized config are quantized into its formats, as a checkpoint would hold them.
        init_dummy_weights(net, seed)
        if declared is not None:
            formats = assign_formats(net, declared)
            for name, module in net.named_modules():
                if module in formats.layers:
                    with _naming_layer(name):
                        module.quantize_(formats.layers[module])
    else:
        formats = assign_formats(net, declared) if declared is not None else LayerFormats({}, {})
        tie_packed_embedding(net, formats)
        for name, module in net.named_modules():
            if module in formats.layers:
                with _naming_layer(name):
                    module.set_quant_method(formats.layers[module])
        # A float8 KV cache's per-layer scales go to the attention layers, not to load_weights.
        net.load_weights(route_to_formats(take_kv_scales(net, weights), formats.routes))
        for name, module in net.named_modules():
            if isinstance(module, Linear) and module.quant_method is not None:
                module.quant_method.finish(module, name)
    if quantization == "fp8" and declared is None:
        quantize_fp8(net)
    quantization = quantization or (declared.quant_method if declared is not None else None)
    logger.info("model loaded", extra={"model": model, "load_format": load_format, "dtype": str(dtype),
                                       "quantization": quantization,
                                       "device": str(device), "seconds": round(time.perf_counter() - start, 3)})
    return net, config


def gguf_keeps_packed(device: str | torch.device, quantization: str | None) -> bool:
    """Whether a GGUF's 4-bit projections stay packed (torch's int4 CPU kernel) rather than dequantized to float:
    on the CPU, with no other quantization asked for, unless SERVAL_GGUF_DEQUANTIZE=1 (today's float32 path, for
    comparisons)."""
    from serval.layers.quant.gguf import int4_kernel_available
    return (torch.device(device).type == "cpu" and quantization is None and int4_kernel_available()
            and os.environ.get(GGUF_DEQUANTIZE_ENV) != "1")


def gguf_packing(device: str | torch.device, quantization: str | None) -> str | None:
    """How a GGUF's projections stay packed (serval.model.gguf's PACK_*), or None to dequantize them: with
    SERVAL_GGUF=triton as raw blocks for the Triton kernels (any device), on the CPU for torch's int4 kernel;
    None with another quantization asked for or SERVAL_GGUF_DEQUANTIZE=1. On a GPU the Triton kernels are opt-in
    until they have passed their tests compiled on one (so far only in Triton's interpreter): dequantized there
    by default, as before."""
    from serval.model.gguf import PACK_CPU_INT4, PACK_TRITON
    if quantization is not None or os.environ.get(GGUF_DEQUANTIZE_ENV) == "1":
        return None
    if os.environ.get(GGUF_KERNEL_ENV) == "triton":
        return PACK_TRITON
    return PACK_CPU_INT4 if gguf_keeps_packed(device, quantization) else None


def checkpoint_quant(config: transformers.PretrainedConfig) -> quant.CheckpointQuantization | None:
    """The formats a checkpoint's config.json declares (its quantization_config), or None; raises naming the
    format for one Serval cannot read."""
    quantization_config = getattr(config, "quantization_config", None)
    if not quantization_config:
        return None
    if not isinstance(quantization_config, dict):
        quantization_config = quantization_config.to_dict()
    if quantization_config.get("quant_method") in MODEL_DEQUANTIZED_FORMATS:
        return None
    return quant.parse(quantization_config)


def checkpoint_quantization(config: transformers.PretrainedConfig) -> str | None:
    """The quant_method a checkpoint declares ("fp8", "compressed-tensors", "awq", "gptq") or None."""
    declared = checkpoint_quant(config)
    return declared.quant_method if declared is not None else None


@dataclass
class LayerFormats:
    """Each quantized linear layer's format, and where each checkpoint module's tensors go."""
    layers: dict[Linear, quant.QuantMethod]
    routes: dict[str, tuple[Linear, str | None]]  # checkpoint module name -> (layer, shard of a merged layer)


def assign_formats(model: nn.Module, declared: quant.CheckpointQuantization) -> LayerFormats:
    """The format of every linear layer, asked by its checkpoint name(s): a merged layer's projections (q/k/v,
    gate/up) must agree. A head tied to the embedding stays as it is, unless its format also serves the
    embedding's rows (a GGUF's Q8_0 table on the CPU: tie_packed_embedding)."""
    formats = LayerFormats({}, {})
    tied = bool(getattr(model, "tie_word_embeddings", False))
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        if tied and name.split(".")[-1] == "lm_head" and \
                not getattr(declared.method_for(name), "serves_embedding", False):
            continue
        parent = name.rpartition(".")[0]
        shard_names = {shard: f"{parent}.{shard}_proj" if parent else f"{shard}_proj"
                       for shard in module.shard_names}
        methods = {declared.method_for(n) for n in (shard_names.values() or [name])}
        if len(methods) > 1:
            raise ValueError(f"{declared.quant_method} checkpoint: the projections merged into {name} "
                             f"({', '.join(shard_names.values())}) are in different formats "
                             f"({sorted(m.name if m else 'unquantized' for m in methods)}); mixed formats in one "
                             "merged layer are not supported")
        method = methods.pop()
        if method is None:
            continue
        formats.layers[module] = method
        formats.routes[name] = (module, None)  # a checkpoint that stores the merged projection as one
        for shard, checkpoint_name in shard_names.items():
            formats.routes[checkpoint_name] = (module, shard)
    return formats


def tie_packed_embedding(model: nn.Module, formats: LayerFormats) -> None:
    """A tied LM head whose format embeds too (serval.layers.quant.gguf_q8) holds the one table: the embedding
    drops its float weight and reads its rows from the head. Before the formats create their weights, while the
    two modules still share the weight that tells which embedding is tied."""
    head = getattr(model, "lm_head", None)
    if head not in formats.layers or not formats.layers[head].serves_embedding or \
            not getattr(model, "tie_word_embeddings", False):
        return
    tied = [m for m in model.modules() if isinstance(m, Embedding) and m.weight is head.weight]
    if len(tied) != 1:
        raise ValueError(f"{type(model).__name__}: the packed LM head is tied to {len(tied)} embeddings; expected 1")
    tied[0].read_rows_from(head)


def route_to_formats(weights: Iterable[tuple[str, torch.Tensor]],
                     routes: dict[str, tuple[Linear, str | None]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors, less those only a layer's format reads (handed to it on the way)."""
    for hf_name, tensor in weights:
        module_name, _, suffix = hf_name.rpartition(".")
        route = routes.get(module_name)
        if route is not None and suffix in route[0].quant_method.routed_tensors:
            layer, shard = route
            layer.quant_method.load(layer, shard, suffix, tensor, hf_name)
            continue
        yield hf_name, tensor


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
    for module in model.modules():
        if isinstance(module, FusedMoE):  # experts: float8 stacks, scales per expert and row (layers/moe.py)
            module.quantize_fp8_()


def apply_hf_overrides(config: transformers.PretrainedConfig, overrides: dict | None) -> None:
    """vLLM's hf_overrides: each key's value replaces the config's (a mapping is merged into a mapping field, as
    rope_parameters takes {"factor": 4.0}). A key the config lacks raises ValueError naming it: a misspelt field
    would otherwise change nothing, silently."""
    for key, value in (overrides or {}).items():
        if not hasattr(config, key):
            raise ValueError(f"invalid hf_overrides key {key!r}: {type(config).__name__} has no such field")
        current = getattr(config, key)
        if isinstance(value, dict) and isinstance(current, dict):
            value = {**current, **value}
        setattr(config, key, value)


def load_config(model_dir: str) -> transformers.PretrainedConfig:
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"no config.json in {model_dir!r}; a safetensors or dummy load needs one")
    return transformers.AutoConfig.from_pretrained(model_dir)


def build_model(config: transformers.PretrainedConfig, dtype: torch.dtype, device: str | torch.device,
                runner: str = "auto") -> nn.Module:
    """The model for config.architectures[0] (runner "pooling": its pooling model, see registry.get_model_class),
    parameters allocated (not initialized) in dtype on device."""
    model_class = registry.get_model_class(config, runner)
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
def _naming_layer(name: str):
    """A format's refusal (shape, group size) says which layer it is about."""
    try:
        yield
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from error


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    # Parameters are created in the target dtype rather than cast after: no float32 copy of the model ever exists.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
