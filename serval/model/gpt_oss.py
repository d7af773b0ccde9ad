"""gpt-oss (OpenAI, 2025): a pre-norm mixture-of-experts decoder with attention sinks.

    h = x + Attn(RMSNorm(x));  out = h + MoE(RMSNorm(h))
    Attn: q/k/v/o with biases, YaRN rope, GQA; layers alternate a sliding window (even layers, 128 tokens in the
          released models) and full attention (config.layer_types); each head has a learned sink logit that joins
          its softmax with no value, so a head can attend to nothing
    MoE:  router with a bias, the top k logits softmaxed among themselves; experts with biases and a clamped
          SwiGLU, (up + 1) * gate * sigmoid(1.702 * gate), gate clamped above at 7 and up to [-7, 7]

Checkpoints: transformers' bf16 layout stacks the experts transposed, `mlp.experts.gate_up_proj` [E, H, 2I] with
gate and up interleaved in its columns and `down_proj` [E, I, H]; the published checkpoints hold the experts in
MXFP4 instead (`gate_up_proj_blocks` [E, 2I, H/32, 16] uint8, two 4-bit e2m1 values a byte, low nibble first, and
`gate_up_proj_scales` [E, 2I, H/32], a power-of-two exponent biased by 127 per 32 values), which are dequantized
here at load to the model dtype (keeping them packed is later work). Serval's stacked parameters are [E, 2I, H] and
[E, H, I], with gate/up left interleaved as ClampedSwiGLU reads them.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn

from serval.layers.attention import Attention, AttentionMetadata
from serval.layers.embedding import Embedding
from serval.layers.linear import Linear, qkv_linear
from serval.layers.moe import ClampedSwiGLU, FusedMoE, route_top_k_softmax
from serval.layers.norm import RMSNorm
from serval.layers.rotary import RotaryEmbedding, rope_parameters
from serval.model.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel, sliding_window_of

# e2m1: sign bit, two exponent bits, one mantissa bit; index = the 4-bit code.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_BLOCK = 32  # values sharing one scale
_SCALE_BIAS = 127


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks [..., G, 16] uint8 and scales [..., G] uint8 -> [..., G * 32] values in dtype."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != MXFP4_BLOCK // 2:
        raise ValueError(f"MXFP4 blocks of shape {tuple(blocks.shape)} and scales of shape {tuple(scales.shape)} "
                         f"do not pair: expected blocks [..., G, {MXFP4_BLOCK // 2}] and scales [..., G]")
    table = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    blocks = blocks.to(torch.uint8)
    values = torch.stack((table[(blocks & 0x0F).long()], table[(blocks >> 4).long()]), dim=-1).flatten(-2)
    values = torch.ldexp(values, scales.to(torch.int32)[..., None] - _SCALE_BIAS)
    return values.flatten(-2).to(dtype)


class GptOssAttention(nn.Module):
    def __init__(self, config, layer_idx: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.qkv_proj = qkv_linear(config.hidden_size, num_heads, num_kv_heads, self.head_dim, config.attention_bias)
        self.o_proj = Linear(num_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)
        self.sinks = nn.Parameter(torch.empty(num_heads), requires_grad=False)
        self.attn = Attention(num_heads, num_kv_heads, self.head_dim, scale=self.head_dim ** -0.5,
                              rotary_emb=rotary_emb, sliding_window=sliding_window_of(config, layer_idx))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        q, k, v = (x.unflatten(-1, (-1, self.head_dim)) for x in (q, k, v))
        out = self.attn(positions, q, k, v, kv_cache, metadata, sinks=self.sinks)
        return self.o_proj(out.flatten(-2))


# transformers 5.17 (the H200 machine's) hard-codes the SwiGLU alpha and its GptOssConfig has no field for it
# (5.24 has one, defaulting to the same 1.702): a config without the fields takes gpt-oss's values.
SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0


def swiglu_of(config) -> ClampedSwiGLU:
    return ClampedSwiGLU(getattr(config, "swiglu_alpha", SWIGLU_ALPHA), getattr(config, "swiglu_limit", SWIGLU_LIMIT))


class GptOssMLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, config.num_local_experts, bias=True)
        self.experts = FusedMoE(config.num_local_experts, config.hidden_size, config.intermediate_size, bias=True,
                                activation=swiglu_of(config))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden, route_top_k_softmax(self.router(hidden), self.top_k))


class GptOssDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = GptOssAttention(config, layer_idx, rotary_emb)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GptOssMLP(config)

    # The same pre-norm block as Llama's (the same four submodule names): its forward, not a copy.
    forward = LlamaDecoderLayer.forward


class GptOssModel(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings, rope_parameters(config))
        self.layers = nn.ModuleList(GptOssDecoderLayer(config, i, self.rotary_emb)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    # Llama's loop over the same submodule names (embed_tokens, layers, norm): its forward, not a copy.
    forward = LlamaModel.forward


class GptOssForCausalLM(LlamaForCausalLM):
    """Llama's interface and weight loading (merged q/k/v, tied head), its own decoder; expert tensors are put in
    Serval's layout (and MXFP4 ones dequantized) before they reach LlamaForCausalLM.load_weights. Decode runs from
    CUDA graphs: the experts are the fused kernel (biases and the clamped SwiGLU included) and attention with
    sinks and windows the Triton kernel, neither of which reads anything on the host."""

    def __init__(self, config) -> None:
        nn.Module.__init__(self)
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported for gpt-oss; supported: ['silu'] "
                             "(its experts' clamped SwiGLU)")
        self.config = config
        self.model = GptOssModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.vocab_size = config.vocab_size

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._in_serval_layout(weights))

    def _in_serval_layout(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        dtype = self.lm_head.weight.dtype
        pending: dict[str, dict[str, torch.Tensor]] = {}  # MXFP4 weight name -> its blocks and scales seen so far
        for name, tensor in weights:
            if name.endswith(("_blocks", "_scales")):
                weight_name, part = name.rsplit("_", 1)
                pending.setdefault(weight_name, {})[part] = tensor
                if len(pending[weight_name]) == 2:
                    parts = pending.pop(weight_name)
                    yield weight_name, dequantize_mxfp4(parts["blocks"], parts["scales"], dtype)
            elif name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                yield name, tensor.transpose(1, 2)  # transformers keeps them [E, in, out]
            else:
                yield name, tensor
        if pending:
            halves = {name: sorted(parts) for name, parts in pending.items()}
            raise ValueError(f"MXFP4 expert weights need both _blocks and _scales; the checkpoint has only {halves}")
