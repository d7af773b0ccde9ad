"""The Llama family: Llama 2/3/3.1, Mistral, Qwen2 and Qwen3 are one pre-norm decoder with small switches.

    h = x + Attn(RMSNorm(x));  out = h + MLP(RMSNorm(h))          (Touvron et al., 2023)
    Attn: merged qkv projection, [Qwen3: per-head RMSNorm of q and k], RoPE, paged causal GQA, o_proj
    MLP:  merged gate/up projection, SiLU(gate) * up, down_proj  (SwiGLU)

Qwen2 adds a bias to q/k/v; Qwen3 normalizes q and k per head and sets head_dim explicitly; Mistral (and Qwen
layers marked "sliding_attention") attend to the last `sliding_window` positions only. Module names follow the
Hugging Face checkpoints so that load_weights maps names directly, except for the merged projections.
Devices and fusions are the layers' business (serval.layers): Attention rotates q and k, writes the KV cache and
attends, GatedMLP fuses SwiGLU into its down projection, and a quantized Linear runs its own format.

Input is a flat batch: the new tokens of every scheduled request, concatenated, no padding (see AttentionMetadata).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from serval.layers.activation import silu_and_mul
from serval.layers.attention import Attention, AttentionMetadata
from serval.layers.embedding import Embedding
from serval.layers.linear import Linear, MergedLinear, fuses_norms, qkv_linear, takes_gemv
from serval.layers.mlp import GatedMLP
from serval.layers.norm import RMSNorm, rms_norm_heads
from serval.layers.rotary import RotaryEmbedding, rope_parameters

# Checkpoint projection name -> (our merged module, its shard).
_MERGED_PROJECTIONS = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
}


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window_of(config, layer_idx: int) -> int | None:
    """The layer's attention window, or None for full attention.

    Configs with `layer_types` (Qwen2/3 in transformers 5) say per layer; Mistral applies sliding_window to all.
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or layer_types is None:
        return window
    return window if layer_types[layer_idx] == "sliding_attention" else None


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_idx: int, rotary_emb: RotaryEmbedding, qkv_bias: bool, o_bias: bool,
                 qk_norm: bool) -> None:
        super().__init__()
        num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        self.qkv_proj = qkv_linear(config.hidden_size, num_heads, num_kv_heads, self.head_dim, qkv_bias)
        self.o_proj = Linear(num_heads * self.head_dim, config.hidden_size, bias=o_bias)
        # Qwen3 normalizes each head of q and k; the others pass them through, so forward has no switch.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else nn.Identity()
        self.attn = Attention(num_heads, num_kv_heads, self.head_dim, scale=self.head_dim ** -0.5,
                              rotary_emb=rotary_emb, sliding_window=sliding_window_of(config, layer_idx))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        return self.o_proj(self.attend(positions, self.qkv_proj(hidden), kv_cache, metadata))

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor, kv_cache: torch.Tensor,
               metadata: AttentionMetadata) -> torch.Tensor:
        """The merged projection's output [T, q + k + v] -> the attention's [T, heads x head_dim], o_proj's input."""
        q, k, v = self.qkv_proj.split(qkv)
        q, k, v = (x.unflatten(-1, (-1, self.head_dim)) for x in (q, k, v))  # [T, heads, head_dim]
        q, k = rms_norm_heads(q, k, self.q_norm, self.k_norm)
        return self.attn(positions, q, k, v, kv_cache, metadata).flatten(-2)


def dense_mlp(config, layer_idx: int) -> nn.Module:
    return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                    bias=getattr(config, "mlp_bias", False))


class LlamaDecoderLayer(nn.Module):
    """`mlp` is the feed-forward block: Llama's GatedMLP, or a mixture of experts (mixtral.py, qwen_moe.py)."""

    def __init__(self, config, layer_idx: int, rotary_emb: RotaryEmbedding, mlp: nn.Module,
                 **attention_options) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx, rotary_emb, **attention_options)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                kv_cache: torch.Tensor, metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual stream is carried beside the block output so each norm can fuse "add, then normalize".
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


def _fuses_norms(model: LlamaModel, hidden: torch.Tensor) -> bool:
    """One row on the GEMV path through plain Llama blocks only: the families that borrow LlamaModel's forward
    with their own attention or experts (DeepSeek-V3, gpt-oss, the MoE blocks) keep their norms as kernels."""
    if not takes_gemv(hidden, hidden.shape[-1]):  # first: false for every prefill and off the GEMV path (CPU)
        return False
    projections = []
    for layer in model.layers:
        attention, mlp = layer.self_attn, getattr(layer, "mlp", None)
        if not (type(attention) is LlamaAttention and type(mlp) is GatedMLP and mlp.act_and_mul is silu_and_mul
                and type(layer.input_layernorm) is RMSNorm and type(layer.post_attention_layernorm) is RMSNorm):
            return False
        projections += [attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj]
    return fuses_norms(hidden, *projections)


def _layers_one_row(model: LlamaModel, positions: torch.Tensor, stream: torch.Tensor, kv_caches: list[torch.Tensor],
                    metadata: AttentionMetadata, captured: dict[int, torch.Tensor], keep: tuple[int, ...]
                    ) -> torch.Tensor:
    """The layers at batch 1 as four GEMVs each and no norm kernel but the first: o_proj and down_proj add the
    residual and start the next RMSNorm (its weight-scaled row and sums of squares), qkv_proj and gate_up_proj
    finish it (Linear.forward_add, forward_normed). Returns the stream after the last layer (the model's final
    norm is a kernel again); the streams entering the layers in keep go to captured."""
    layers = model.layers
    pending, normed = None, layers[0].input_layernorm(stream)  # no GEMV before the first norm
    for index, (layer, kv_cache) in enumerate(zip(layers, kv_caches, strict=True)):
        if index in keep:
            captured[index] = stream
        attention, mlp = layer.self_attn, layer.mlp
        qkv = attention.qkv_proj(normed) if pending is None else attention.qkv_proj.forward_normed(pending)
        stream, pending = attention.o_proj.forward_add(attention.attend(positions, qkv, kv_cache, metadata), stream,
                                                       layer.post_attention_layernorm)
        gate_up = mlp.gate_up_proj.forward_normed(pending)
        next_norm = layers[index + 1].input_layernorm if index + 1 < len(layers) else None
        stream, pending = mlp.down_proj.forward_add(gate_up, stream, next_norm, gated=True)
    return stream


class LlamaModel(nn.Module):
    # EAGLE-3 (serval.engine.spec_decode.eagle3) sets the layers whose input it reads: each forward then keeps the
    # residual stream entering them, [T, len(layers) x hidden] in sorted layer order, as aux_hidden_states (vLLM's
    # aux layer ids: transformers' output_hidden_states[i]). Empty: nothing is kept, nothing is paid.
    aux_hidden_state_layers: tuple[int, ...] = ()
    aux_hidden_states: torch.Tensor | None = None
    # Where CUDA graphs leave them: a forward of at most this many rows also writes its states to the first rows
    # (a graph replay refills the same rows; aux_hidden_states is then the capture's, not the replay's).
    aux_hidden_buffer: torch.Tensor | None = None

    def __init__(self, config, make_mlp=dense_mlp, **attention_options) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        # One table of cos/sin for all layers; each layer's attention holds it.
        self.rotary_emb = RotaryEmbedding(head_dim_of(config), config.max_position_embeddings,
                                          rope_parameters(config))
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, self.rotary_emb, make_mlp(config, i),
                                                      **attention_options)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                metadata: AttentionMetadata) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        captured, keep = {}, getattr(self, "aux_hidden_state_layers", ())  # DeepSeek-V3, gpt-oss borrow forward
        if _fuses_norms(self, hidden):
            hidden = _layers_one_row(self, positions, hidden, kv_caches, metadata, captured, keep)
        else:
            for index, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
                if index in keep:
                    captured[index] = hidden if residual is None else hidden + residual
                hidden, residual = layer(positions, hidden, residual, kv_cache, metadata)
        if captured:
            states = torch.cat([captured[i] for i in sorted(keep)], dim=-1)
            buffer = getattr(self, "aux_hidden_buffer", None)
            if buffer is not None and len(states) <= len(buffer):
                states = buffer[:len(states)].copy_(states)
            self.aux_hidden_states = states
        return self.norm(hidden) if residual is None else self.norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    # Architecture switches; subclasses below flip them.
    qkv_bias: bool | None = None  # None: config.attention_bias decides, for o_proj too
    qk_norm: bool = False
    make_mlp = staticmethod(dense_mlp)  # layer i's feed-forward block; the MoE families (mixtral.py) give theirs

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.make_mlp, qkv_bias=self.qkv_bias_of(config),
                                o_bias=bool(getattr(config, "attention_bias", False)), qk_norm=self.qk_norm)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # What the model runner sizes the KV cache with.
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        self.vocab_size = config.vocab_size

    def qkv_bias_of(self, config) -> bool:
        return bool(getattr(config, "attention_bias", False)) if self.qkv_bias is None else self.qkv_bias

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids/positions [T] (flat, all requests) -> final hidden states [T, hidden]."""
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> float32 logits [N, vocab]; called only on the rows that are sampled from."""
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the model; raise naming any unknown, mis-shaped or missing weight."""
        # A float8 layer (the loader's empty_fp8_) also takes its per-row scales from the checkpoint.
        params = dict(self.named_parameters()) | {name: scale for name, scale in self.named_buffers()
                                                  if name.endswith(".weight_scale")}
        expected = {(name, shard) for name, param in params.items() for shard in self._shards_of(name)}
        loaded: set[tuple[str, str | None]] = set()
        unknown: list[str] = []
        for hf_name, tensor in weights:
            if "rotary_emb." in hf_name:  # inv_freq and cos/sin caches of older checkpoints: recomputed here
                continue
            name, shard = self._our_name(hf_name)
            if name.endswith(".input_scale") and name.replace("input_scale", "weight_scale") in params:
                continue  # a static activation scale: activations are quantized per token instead
            if name not in params:
                unknown.append(hf_name)
                continue
            param = params[name]
            target = param.data if shard is None else self._module_of(name).shard(param.data, shard)
            if name.endswith(".weight_scale"):
                tensor = _row_scales(hf_name, tensor, len(target))
            if target.shape != tensor.shape:
                raise ValueError(f"weight {hf_name!r} has shape {tuple(tensor.shape)}; the model (from config.json) "
                                 f"expects {tuple(target.shape)}")
            if target.dtype == torch.float8_e4m3fn and tensor.dtype != target.dtype:
                raise ValueError(f"weight {hf_name!r} is {tensor.dtype}; the checkpoint declares fp8, so it must be "
                                 "torch.float8_e4m3fn")
            target.copy_(tensor)
            loaded.add((name, shard))
        missing = sorted(self._hf_name(name, shard) for name, shard in expected - loaded)
        if unknown or missing:
            raise ValueError(f"checkpoint does not match {type(self).__name__}: "
                             f"unknown weights {_preview(unknown)}, missing weights {_preview(missing)}")

    def _our_name(self, hf_name: str) -> tuple[str, str | None]:
        if self.tie_word_embeddings and hf_name == "lm_head.weight":
            return "model.embed_tokens.weight", None  # named_parameters lists the shared tensor once, by this name
        parts = hf_name.split(".")
        if len(parts) >= 2 and parts[-2] in _MERGED_PROJECTIONS:
            merged, shard = _MERGED_PROJECTIONS[parts[-2]]
            return ".".join(parts[:-2] + [merged, parts[-1]]), shard
        return hf_name, None

    def _hf_name(self, name: str, shard: str | None) -> str:
        if shard is None:
            return name
        merged = name.split(".")[-2]
        projection = next(p for p, (m, s) in _MERGED_PROJECTIONS.items() if m == merged and s == shard)
        return name.replace(f".{merged}.", f".{projection}.")

    def _module_of(self, param_name: str) -> nn.Module:
        return self.get_submodule(param_name.rsplit(".", 1)[0])

    def _shards_of(self, param_name: str) -> tuple[str | None, ...]:
        module = self._module_of(param_name)
        return module.shard_names if isinstance(module, MergedLinear) else (None,)


class MistralForCausalLM(LlamaForCausalLM):
    pass  # Llama plus config.sliding_window, which the attention reads


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True


def _row_scales(hf_name: str, scale: torch.Tensor, rows: int) -> torch.Tensor:
    """A checkpoint's weight_scale as one float32 scale per output row: a per-tensor scale ([] or [1]) repeated,
    or a per-channel one ([rows] or [rows, 1]) as it is."""
    if scale.numel() == 1:
        return scale.float().reshape(1).expand(rows)
    if scale.numel() == rows:
        return scale.float().reshape(rows)
    raise ValueError(f"weight scale {hf_name!r} has shape {tuple(scale.shape)}: expected one scale, or one per "
                     f"output row ({rows})")


def _preview(names: list[str], limit: int = 8) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return f"[{shown}{f', ... ({len(names) - limit} more)' if len(names) > limit else ''}]"
