"""The interface every quantization format implements on a Linear layer: create, load and apply its weights.

A format is a small frozen object held by the layer (`layer.quant_method`); the layer's own tensors (buffers and
parameters) carry the state, so one object serves every layer of a scheme and two layers agree on a format when
their objects are equal. The model file never learns which format it runs:

    create_weights(layer)   room for the checkpoint's tensors, in the layout the format's kernel reads
    load(layer, ...)        one checkpoint tensor (named in routed_tensors) for one shard of a merged layer
    finish(layer)           after loading: check that every shard got every tensor, repack if needed
    quantize_dense(layer)   the layer's float weight into this format (quantization= on a float checkpoint,
                            dummy weights for benchmarks)
    apply(layer, x, gated)  y = x @ W^T + b; gated: x is a merged gate/up output and the product is with
                            silu(gate) * up
    embed(layer, ids, dtype) rows of W, for a tied LM head's format that serves the embedding too
                            (serves_embedding: GGUF's Q8_0 table on the CPU)

Tensors the model's own load_weights already copies (`weight`, `weight_scale`, `bias`) stay with it; the loader
hands the format only the tensors in routed_tensors.
"""
from __future__ import annotations

import torch


class QuantMethod:
    """A quantization format on a Linear layer. Subclasses are frozen dataclasses (equal when the scheme is)."""

    name = "none"  # as the checkpoint's quantization_config names it, for messages
    routed_tensors: tuple[str, ...] = ()  # checkpoint tensor suffixes the loader hands to load()
    serves_embedding = False  # embed() gives rows of the table: the tied embedding keeps no copy

    def create_weights(self, layer) -> None:
        raise NotImplementedError

    def load(self, layer, shard: str | None, suffix: str, tensor: torch.Tensor, hf_name: str) -> None:
        raise ValueError(f"{self.name}: {hf_name!r} is not a tensor of this format")

    def finish(self, layer, layer_name: str) -> None:
        pass

    def quantize_dense(self, layer) -> None:
        raise ValueError(f"{self.name} cannot quantize a float checkpoint at load time")

    def apply(self, layer, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, layer, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} does not serve an embedding's rows")


def shard_rows(layer, shard: str | None) -> tuple[int, int]:
    """(first output row, number of rows) of one projection of a merged layer; the whole layer for None."""
    if shard is None:
        return 0, layer.out_features
    return layer.offsets[shard], layer.output_sizes[shard]


def mark_loaded(layer, shard: str | None, suffix: str) -> None:
    loaded = layer.__dict__.setdefault("quant_loaded", set())
    loaded.add((shard, suffix))


def check_loaded(layer, layer_name: str, format_name: str, required: tuple[str, ...]) -> None:
    """Raise naming the layer and the tensors a checkpoint left out (every shard must bring every tensor)."""
    loaded = layer.__dict__.get("quant_loaded", set())
    shards = layer.shard_names or (None,)
    whole = {suffix for shard, suffix in loaded if shard is None}
    missing = [f"{layer_name}[{shard}].{suffix}" if shard else f"{layer_name}.{suffix}"
               for shard in shards for suffix in required
               if (shard, suffix) not in loaded and suffix not in whole]
    if missing:
        raise ValueError(f"{format_name} checkpoint: missing tensors {missing[:8]}")
    layer.__dict__.pop("quant_loaded", None)
