"""Sparse mixture-of-experts feed-forward (Shazeer et al., 2017; Fedus et al., 2021): a router picks k of E SwiGLU
experts per token and the block returns their outputs weighted by the router's scores.

    logits = gate(x);  (weights, experts) = route(logits);  out = sum_j weights_j * expert_j(x)  [+ shared expert]

Routing is per family (`softmax_top_k`): Mixtral takes the softmax over all experts, keeps the top k and
renormalizes them to sum to one; Qwen2-MoE and Qwen3-MoE do the same but renormalize only when the config's
`norm_topk_prob` says so (false by default in Qwen2-MoE, true in Qwen3-MoE's checkpoints). Qwen2-MoE adds a shared
expert every token goes through, scaled by sigmoid(shared_expert_gate(x)). gpt-oss (`top_k_softmax`) keeps the k
largest logits of a router with a bias and takes the softmax over those k only. DeepSeek-V3
(`sigmoid_group_top_k`) scores experts by sigmoid, picks the best `topk_group` of `n_group` groups by the sum of
each group's two best scores plus a load-balancing correction bias, takes the top k within those groups, and
weights them by their sigmoid scores (renormalized, then times routed_scaling_factor).
Where the experts run on Triton, Mixtral's and Qwen's routing is one kernel (serval.kernels.triton_routing: softmax,
top k, renormalization and rounding per token row) and a batch-1 router product the Triton GEMV; these functions
are its reference and the CPU path.

gpt-oss's experts also carry biases and a clamped SwiGLU (`ClampedSwiGLU`, gate/up rows interleaved): both
backends take them as options (the kernel adds the biases and applies the clamp in its GEMMs' epilogues), so
gpt-oss runs the fused kernel on CUDA as Mixtral and Qwen do.

The experts' weights are stacked, as transformers 5 keeps them: `gate_up_proj` [E, 2 * I, H] (gate rows, then up
rows) and `down_proj` [E, H, I]. Which implementation computes them is chosen here, as Attention chooses its
backend: the fused Triton kernel on CUDA (serval.kernels.triton_moe: tokens grouped by expert, two grouped
GEMMs), `fused_experts_reference` (a loop over experts) elsewhere; SERVAL_MOE_BACKEND=torch|triton overrides, e.g.
to run the kernel in Triton's interpreter on CPU (TRITON_INTERPRET=1).

quantization="fp8" stores both stacks in float8 e4m3 with a float32 scale per expert and output row
(`FusedMoE.quantize_fp8_`): half the bytes a decode step reads from the experts, which is most of what a MoE
decode step reads. Activations stay in the model dtype (weight-only): the kernel widens each float8 tile and
scales its float32 accumulator.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from serval.layers.fp8 import FP8, quantize_weight
from serval.layers.linear import takes_gemv
from serval.layers.mlp import GatedMLP

_BACKENDS = ("torch", "triton")
# serval.kernels.triton_routing.MAX_EXPERTS (not imported here: CPU-only installs may lack triton).
ROUTING_KERNEL_MAX_EXPERTS = 1024


@dataclass
class ExpertRouting:
    """Which experts each token goes to, and with what weight."""
    weights: torch.Tensor  # [T, k] float32
    expert_ids: torch.Tensor  # [T, k] int64

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[-1]


def softmax_top_k(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> ExpertRouting:
    """The k largest of softmax(logits) in float32 (ties to the lower expert id, as torch.topk), optionally
    rescaled to sum to one. Mixtral: renormalize=True; Qwen2/3-MoE: renormalize=config.norm_topk_prob."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, expert_ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ExpertRouting(weights, expert_ids)


def top_k_softmax(router_logits: torch.Tensor, top_k: int) -> ExpertRouting:
    """gpt-oss: the k largest logits, then the softmax over those k (in the logits' dtype, as transformers)."""
    values, expert_ids = torch.topk(router_logits, top_k, dim=-1)
    return ExpertRouting(torch.softmax(values, dim=-1).float(), expert_ids)


def route_top_k_softmax(router_logits: torch.Tensor, top_k: int) -> ExpertRouting:
    """top_k_softmax, on the routing kernel where the experts run on Triton (gpt-oss's MLP calls this)."""
    if routing_on_kernel(router_logits):
        from serval.kernels import triton_routing
        weights, expert_ids = triton_routing.route(router_logits, top_k, softmax_first=False,
                                                   round_weights=router_logits.dtype != torch.float32)
        return ExpertRouting(weights, expert_ids)
    return top_k_softmax(router_logits, top_k)


def sigmoid_group_top_k(router_logits: torch.Tensor, top_k: int, num_groups: int, top_k_groups: int,
                        correction_bias: torch.Tensor, renormalize: bool, scaling_factor: float) -> ExpertRouting:
    """DeepSeek-V3's router (see the module docstring), in float32. The bias steers which experts are chosen,
    never their weights."""
    scores = torch.sigmoid(router_logits.float())
    choice = scores + correction_bias.float()
    num_tokens, num_experts = choice.shape
    grouped = choice.view(num_tokens, num_groups, num_experts // num_groups)
    group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1)[0].sum(dim=-1)
    best_groups = torch.topk(group_scores, top_k_groups, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
    choice = choice.masked_fill(~group_mask.repeat_interleave(num_experts // num_groups, dim=1), float("-inf"))
    expert_ids = torch.topk(choice, top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, expert_ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ExpertRouting(weights * scaling_factor, expert_ids)


@dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss's expert activation: gate and up interleaved (even, odd columns), gate clamped above and up on both
    sides at `limit`, then (up + 1) * gate * sigmoid(alpha * gate)."""
    alpha: float
    limit: float

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


def silu_gate_then_up(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def fused_experts_reference(hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                            routing: ExpertRouting, gate_up_bias: torch.Tensor | None = None,
                            down_bias: torch.Tensor | None = None, activation: ClampedSwiGLU | None = None,
                            gate_up_scale: torch.Tensor | None = None,
                            down_scale: torch.Tensor | None = None) -> torch.Tensor:
    """sum_j weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = expert_ids[t, j]: the reference the kernel
    is tested against and what CPU runs. Each expert's product is rounded to the model dtype, weighted in float32
    and summed in float32, as the kernel does. gpt-oss: biases [E, 2I] and [E, H], and its ClampedSwiGLU
    (None: SiLU over the gate rows times the up rows). fp8 experts: float8 weights with float32 scales per expert
    and output row ([E, 2I], [E, H]), dequantized one expert at a time."""
    activation = activation or silu_gate_then_up
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for expert in torch.unique(routing.expert_ids).tolist():
        tokens, slots = torch.nonzero(routing.expert_ids == expert, as_tuple=True)
        gate_up = F.linear(hidden[tokens], _expert_weight(gate_up_proj, gate_up_scale, expert, hidden.dtype),
                           None if gate_up_bias is None else gate_up_bias[expert])
        expert_out = F.linear(activation(gate_up), _expert_weight(down_proj, down_scale, expert, hidden.dtype),
                              None if down_bias is None else down_bias[expert])
        out.index_add_(0, tokens, expert_out.float() * routing.weights[tokens, slots, None])
    return out.to(hidden.dtype)


def _expert_weight(stacked: torch.Tensor, scale: torch.Tensor | None, expert: int, dtype: torch.dtype) -> torch.Tensor:
    if scale is None:
        return stacked[expert]
    return (stacked[expert].float() * scale[expert, :, None]).to(dtype)


class FusedMoE(nn.Module):
    """E SwiGLU experts with stacked weights; forward(x, routing) -> the routed, weighted sum [T, H].
    gpt-oss: bias=True adds gate_up_proj_bias [E, 2I] and down_proj_bias [E, H], and `activation` replaces SiLU
    (ClampedSwiGLU, whose gate/up rows are interleaved as its checkpoints store them)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, bias: bool = False,
                 activation: ClampedSwiGLU | None = None) -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size),
                                         requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False)
        self.gate_up_proj_bias = (nn.Parameter(torch.empty(num_experts, 2 * intermediate_size), requires_grad=False)
                                  if bias else None)
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False) if bias else None
        self.activation = activation
        # quantization="fp8" (quantize_fp8_): float32 scales per expert and output row of the float8 weights.
        self.gate_up_proj_scale: nn.Parameter | None = None
        self.down_proj_scale: nn.Parameter | None = None
        self._backend = None  # chosen on the first call, when the device is known

    def quantize_fp8_(self) -> None:
        """Both stacks to float8 e4m3 with one scale per expert and output row, as quantization="fp8" does to a
        linear layer's rows (serval.layers.fp8.quantize_weight), one expert at a time so that the float32 copy
        is one expert's. The kernel widens the tiles and applies the scales; activations stay in the model dtype."""
        for name in ("gate_up_proj", "down_proj"):
            weight = getattr(self, name)
            quantized = torch.empty(weight.shape, dtype=FP8, device=weight.device)
            scale = torch.empty(weight.shape[:2], dtype=torch.float32, device=weight.device)
            for expert in range(self.num_experts):
                quantized[expert], scale[expert] = quantize_weight(weight[expert])
            setattr(self, name, nn.Parameter(quantized, requires_grad=False))
            setattr(self, f"{name}_scale", nn.Parameter(scale, requires_grad=False))

    def shard(self, param: torch.Tensor, shard: tuple[int, str]) -> torch.Tensor:
        """The part of a stacked weight that one checkpoint tensor fills: (expert, "gate" | "up" | "down")."""
        expert, projection = shard
        if projection == "down":
            return param[expert]
        offset = 0 if projection == "gate" else self.intermediate_size
        return param[expert].narrow(0, offset, self.intermediate_size)

    def shard_names(self, param_name: str) -> list[tuple[int, str]]:
        projections = ("down",) if param_name == "down_proj" else ("gate", "up")
        return [(expert, projection) for expert in range(self.num_experts) for projection in projections]

    def forward(self, hidden: torch.Tensor, routing: ExpertRouting) -> torch.Tensor:
        if self._backend is None:
            self._backend = moe_backend(hidden.device)
        if self.gate_up_proj_bias is None and self.activation is None and self.gate_up_proj_scale is None:
            return self._backend(hidden, self.gate_up_proj, self.down_proj, routing)
        return self._backend(hidden, self.gate_up_proj, self.down_proj, routing, gate_up_bias=self.gate_up_proj_bias,
                             down_bias=self.down_proj_bias, activation=self.activation,
                             gate_up_scale=self.gate_up_proj_scale, down_scale=self.down_proj_scale)


def moe_backend_name(device: torch.device) -> str:
    """"triton" on CUDA, "torch" elsewhere; SERVAL_MOE_BACKEND overrides (see the module docstring)."""
    name = os.environ.get("SERVAL_MOE_BACKEND") or ("triton" if device.type == "cuda" else "torch")
    if name not in _BACKENDS:
        raise ValueError(f"invalid SERVAL_MOE_BACKEND={name!r}: allowed {list(_BACKENDS)}")
    return name


def routing_on_kernel(router_logits: torch.Tensor) -> bool:
    """Route with serval.kernels.triton_routing (one kernel) rather than softmax_top_k (eight)? Where the experts
    run on Triton, for routers of up to its MAX_EXPERTS."""
    return (moe_backend_name(router_logits.device) == "triton"
            and router_logits.shape[-1] <= ROUTING_KERNEL_MAX_EXPERTS)


def moe_backend(device: torch.device):
    """The function computing the experts on this device (see the module docstring)."""
    if moe_backend_name(device) == "torch":
        return fused_experts_reference
    from serval.kernels import triton_moe  # imports triton, which CPU-only installs may lack
    return triton_moe.fused_experts


class SparseMoeBlock(nn.Module):
    """Router, routed experts and (Qwen2-MoE) a shared expert with a sigmoid gate. Module names follow the
    Hugging Face checkpoints: gate, experts, shared_expert, shared_expert_gate."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int, renormalize: bool,
                 shared_expert_intermediate_size: int = 0, weights_in_model_dtype: bool = False) -> None:
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        # Qwen's routers round the top-k weights to the model dtype; Mixtral's keep them in float32.
        self.weights_in_model_dtype = weights_in_model_dtype
        # The router and the shared expert's gate are plain nn.Linear: they stay in the model dtype under
        # quantization (their widths, E and 1, are no GEMM shapes worth quantizing).
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = FusedMoE(num_experts, hidden_size, intermediate_size)
        self.shared_expert = (GatedMLP(hidden_size, shared_expert_intermediate_size, "silu")
                              if shared_expert_intermediate_size else None)
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if shared_expert_intermediate_size else None

    def route(self, hidden: torch.Tensor) -> ExpertRouting:
        logits = self.router_logits(hidden)
        round_weights = self.weights_in_model_dtype and hidden.dtype != torch.float32
        if routing_on_kernel(logits):
            from serval.kernels import triton_routing
            weights, expert_ids = triton_routing.route(logits, self.top_k, renormalize=self.renormalize,
                                                       round_weights=round_weights)
            return ExpertRouting(weights, expert_ids)
        routing = softmax_top_k(logits, self.top_k, self.renormalize)
        if round_weights:
            routing.weights = routing.weights.to(hidden.dtype).float()
        return routing

    def router_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """gate(hidden); one row on a GPU through the Triton GEMV, as every other batch-1 projection (cuBLAS's
        kernel for this [E, H] product took 5 us of a 5 ms token, 48 times)."""
        if takes_gemv(hidden, self.gate.in_features):
            from serval.kernels import triton_gemv
            return triton_gemv.gemv(hidden, self.gate.weight).view(*hidden.shape[:-1], -1)
        return self.gate(hidden)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.experts(hidden, self.route(hidden))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(hidden)) * self.shared_expert(hidden)
        return out
