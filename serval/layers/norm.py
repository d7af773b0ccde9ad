"""RMSNorm (Zhang & Sennrich, 2019) with the residual add fused in, as every pre-norm block does both together.

Fusing the add is what lets a GPU kernel read the activations once (serval.kernels.triton_fused, on CUDA); here it
also keeps the decoder layer short.
The arithmetic follows transformers' LlamaRMSNorm exactly (add in the model dtype, normalize in float32, scale in
the model dtype) so that logits match it bit for bit in float32 and closely in bf16/fp16.
Gemma's norm (GemmaRMSNorm) stores w - 1 and scales by (1 + w) in float32 before rounding to the model dtype, as
transformers' Gemma3RMSNorm does; its weights start at zero.
"""
from __future__ import annotations

import torch
from torch import nn


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (weight * normalize(x + residual), x + residual); with residual None, (weight * normalize(x), x)."""
    if residual is not None:
        x = x + residual
    new_residual = x
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype), new_residual


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """normed x alone; with a residual, (normed x + residual, x + residual) for the next block to add to."""
        # 3-D (a per-head norm of a [T, heads, head_dim] view): [T * heads, head_dim] rows, a view at batch 1. The
        # torch math is some eight kernels a call.
        if x.is_cuda and x.dim() >= 2:
            from serval.kernels import triton_fused
            normed, new_residual = triton_fused.rms_norm(x, residual, self.weight, self.eps)
        else:
            normed, new_residual = rms_norm(x, residual, self.weight, self.eps)
        return normed if residual is None else (normed, new_residual)


def rms_norm_heads(query: torch.Tensor, key: torch.Tensor, q_norm: nn.Module,
                   k_norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_norm(query), k_norm(key)) of [T, heads, head_dim] views, Qwen3's per-head norms. On a GPU, with both
    plain RMSNorms, one kernel for the two, in place (serval.kernels.triton_qk_norm); otherwise each module
    (nn.Identity for the families without them)."""
    if query.is_cuda and type(q_norm) is RMSNorm and type(k_norm) is RMSNorm and q_norm.eps == k_norm.eps:
        from serval.kernels import triton_qk_norm
        return triton_qk_norm.rms_norm_qk_(query, key, q_norm.weight, k_norm.weight, q_norm.eps)
    return q_norm(query), k_norm(key)


def gemma_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ((1 + weight) * normalize(x + residual), x + residual), scaled in float32 and then rounded."""
    if residual is not None:
        x = x + residual
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * (1.0 + weight.float())).to(x.dtype), x


class GemmaRMSNorm(RMSNorm):
    """RMSNorm with Gemma's (1 + w) scale; the same residual interface as RMSNorm."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps)
        with torch.no_grad():
            self.weight.zero_()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        # The fused Triton kernel scales by w in the model dtype; Gemma scales by (1 + w) in float32, so the
        # torch reference runs on every device.
        normed, new_residual = gemma_rms_norm(x, residual, self.weight, self.eps)
        return normed if residual is None else (normed, new_residual)
