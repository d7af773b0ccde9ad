"""Linear layers that load Hugging Face checkpoints, including projections merged for fewer, larger matmuls.

q/k/v share one input and so do gate/up: one [sum(out), in] weight turns three (or two) small GEMMs into one,
which matters most at decode batch sizes where each GEMM is bandwidth-bound. A checkpoint stores the parts
separately; `load_shard` copies each into its rows. On a GPU a single half-precision row goes to the Triton GEMV
(SERVAL_GEMV=cublas: torch's matmul; SERVAL_GEMV=triton: the GEMV on CPU too, in Triton's interpreter).
2 to 8 rows (a speculative verify step, a few decode streams) may take the multi-row GEMV instead of cuBLAS:
opt-in with SERVAL_GEMV_ROWS=8, off by default because on the H200 cuBLAS reads 2-8 rows faster
(takes_small_batch_gemv).
A quantized layer holds its format in `quant_method` (serval.layers.quant: fp8, block fp8, int8, 4-bit), which
creates, loads and applies its weights; the model calls the layer the same either way.
"""
from __future__ import annotations

import functools
import logging
import os

import torch
from torch import nn

from serval.layers.activation import silu_and_mul
from serval.layers.quant.base import QuantMethod
from serval.layers.quant.fp8 import Fp8Method

logger = logging.getLogger(__name__)

_GEMV_DTYPES = (torch.bfloat16, torch.float16)
# The most rows serval.kernels.triton_gemv.gemv_rows serves: its [BLOCK_N, rows] accumulator and x tile stay in
# registers, and past a few rows a GEMM reads W as fast.
GEMV_MAX_ROWS = 8


class Linear(nn.Linear):
    """nn.Linear whose weights always come from a checkpoint or the dummy loader."""

    shard_names: tuple[str, ...] = ()

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        # [out_features] float32 for the per-channel formats (fp8, int8); None otherwise.
        self.register_buffer("weight_scale", None)
        self.quant_method: QuantMethod | None = None

    def set_quant_method(self, method: QuantMethod) -> None:
        """Room for a checkpoint's tensors in this format (filled by the model's load_weights and the loader)."""
        if self.quant_method is not None:
            raise ValueError(f"{self!r} is already quantized ({self.quant_method.name})")
        method.create_weights(self)
        self.quant_method = method

    def quantize_(self, method: QuantMethod) -> None:
        """This layer's loaded float weight into the format (in place; done once, after loading)."""
        if self.quant_method is not None:
            raise ValueError(f"{self!r} is already quantized ({self.quant_method.name})")
        method.quantize_dense(self)
        self.quant_method = method

    def quantize_fp8_(self) -> None:
        """Replace the weight by float8 e4m3 with one scale per output row (quantization="fp8")."""
        self.quantize_(Fp8Method())

    def empty_fp8_(self) -> None:
        """Room for a checkpoint's float8 weight and per-row scales (filled by the model's load_weights)."""
        self.set_quant_method(Fp8Method())

    def reset_parameters(self) -> None:
        # Kaiming init is overwritten by every load path and costs seconds on large models on CPU.
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            return self.quant_method.apply(self, x)
        if takes_gemv(x, self.in_features):
            from serval.kernels import triton_gemv
            out = triton_gemv.gemv(x, self.weight, self.bias)
            return out.view(*x.shape[:-1], self.out_features)
        if takes_small_batch_gemv(x, self.in_features):
            from serval.kernels import triton_gemv
            out = triton_gemv.gemv_rows(x, self.weight, self.bias)
            return out.view(*x.shape[:-1], self.out_features)
        return super().forward(x)

    def forward_silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """self(silu(gate) * up) of a merged gate/up output; for one row on a GPU, one fused GEMV."""
        if self.quant_method is not None:  # the format may fuse SwiGLU (fp8: into the activation's quantization)
            return self.quant_method.apply(self, gate_up, gated=True)
        if takes_gemv(gate_up, 2 * self.in_features):
            from serval.kernels import triton_gemv
            out = triton_gemv.gemv(gate_up, self.weight, self.bias, gated=True)
            return out.view(*gate_up.shape[:-1], self.out_features)
        if takes_small_batch_gemv(gate_up, 2 * self.in_features):
            from serval.kernels import triton_gemv
            out = triton_gemv.gemv_rows(gate_up, self.weight, self.bias, gated=True)
            return out.view(*gate_up.shape[:-1], self.out_features)
        return self(silu_and_mul(gate_up))

    def forward_normed(self, normed) -> torch.Tensor:
        """self(RMSNorm(h)) of a norm the GEMV before left pending (serval.kernels.triton_gemv.PendingNorm): one
        GEMV that finishes it; only where fuses_norms says so."""
        from serval.kernels import triton_gemv
        out = triton_gemv.gemv(None, self.weight, self.bias, weight_scale=self.weight_scale, normed=normed)
        return out.view(*normed.scaled.shape[:-1], self.out_features)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor, next_norm: nn.Module | None = None,
                    gated: bool = False):
        """(h, the next norm of h pending or None) for h = self(x) + residual (gated: self(silu(gate) * up) +
        residual), the sum rounded as the unfused add rounds it; one GEMV, only where fuses_norms says so.
        next_norm: the RMSNorm that reads h, whose weight-scaled row and sums of squares this GEMV writes."""
        from serval.kernels import triton_gemv
        if next_norm is None:
            out = triton_gemv.gemv(x, self.weight, self.bias, gated=gated, weight_scale=self.weight_scale,
                                   residual=residual)
            return out.view(*residual.shape), None
        out, pending = triton_gemv.gemv_add_norm(x, self.weight, residual, next_norm.weight, next_norm.eps,
                                                 self.bias, gated=gated, weight_scale=self.weight_scale)
        return out.view(*residual.shape), pending


def fuses_norms(x: torch.Tensor, *layers: nn.Module) -> bool:
    """Whether one row x of pre-norm blocks takes GEMVs that finish the norm before them and add the residual and
    start the next norm after them (forward_normed, forward_add) through these projections: each a plain Linear,
    bfloat16/float16 or float8 with row scales (no LoRA wrapper, no tensor-parallel shard, no other format), on the
    GEMV path. At batch 1 a norm is one small kernel between two GEMVs. By default for float8 weights only, where
    the H200 measured it faster (+1% batch-1 tok/s on the Llama-3-8B shape); with bfloat16 weights the GEMVs' added
    epilogue and sums cost what the norm kernels did (-2.9% with the plain GEMV's blocks, level with the table's
    pending_norm blocks; docs/performance.md). SERVAL_FUSED_NORM=1 takes it for both, 0 for neither."""
    if x.numel() != x.shape[-1] or not takes_gemv(x, x.shape[-1]):  # first: cheap, and false for every prefill
        return False
    choice = os.environ.get("SERVAL_FUSED_NORM", "")
    if choice == "0" or not all(type(layer) in (Linear, MergedLinear)
                                and type(layer.quant_method) in (type(None), Fp8Method) for layer in layers):
        return False
    return choice == "1" or all(type(layer.quant_method) is Fp8Method for layer in layers)


def takes_gemv(x: torch.Tensor, row_length: int) -> bool:
    """One row in half precision: batch-1 decode, where reading the weight is the whole cost and the Triton GEMV
    reads every projection faster than cuBLAS (serval.kernels.triton_gemv). On CUDA unless SERVAL_GEMV=cublas;
    SERVAL_GEMV=triton takes it on any device (on CPU, Triton's interpreter with TRITON_INTERPRET=1, as tests do)."""
    if x.numel() != row_length or x.dtype not in _GEMV_DTYPES:  # first: an eager prefill asks 128 times a step
        return False
    return _gemv_on_device_of(x)


def takes_small_batch_gemv(x: torch.Tensor, row_length: int) -> bool:
    """2 to min(SERVAL_GEMV_ROWS, GEMV_MAX_ROWS) half-precision rows (a speculative verify step, a few decode
    streams): the multi-row Triton GEMV reads W once for all of them (serval.kernels.triton_gemv.gemv_rows).
    Opt-in: SERVAL_GEMV_ROWS unset or 0 keeps cuBLAS, which the H200 measured faster for every Llama-3-8B
    projection at 2, 4, 5 and 8 rows (benchmarks/gemv_bench.py --rows; docs/performance.md, "Small-batch GEMV").
    Devices as takes_gemv: CUDA unless SERVAL_GEMV=cublas, any with SERVAL_GEMV=triton."""
    rows = x.numel() // row_length
    if not 2 <= rows <= GEMV_MAX_ROWS or x.shape[-1] != row_length or x.dtype not in _GEMV_DTYPES:
        return False
    return rows <= _gemv_rows_limit(os.environ.get("SERVAL_GEMV_ROWS", "")) and _gemv_on_device_of(x)


def _gemv_on_device_of(x: torch.Tensor) -> bool:
    """SERVAL_GEMV's choice for x's device: the Triton GEMV on CUDA unless "cublas", anywhere with "triton"."""
    choice = os.environ.get("SERVAL_GEMV")
    return choice == "triton" or (x.is_cuda and choice != "cublas")


@functools.cache
def _gemv_rows_limit(value: str) -> int:
    """SERVAL_GEMV_ROWS as the most rows for gemv_rows (0: off); a value that is no number is off, said once
    instead of failing every forward."""
    if not value.strip():
        return 0
    try:
        return min(int(value), GEMV_MAX_ROWS)
    except ValueError:
        logger.warning("SERVAL_GEMV_ROWS is not a number of rows; the multi-row GEMV stays off",
                       extra={"value": value, "allowed": f"0 (off) or 2..{GEMV_MAX_ROWS}"})
        return 0


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim: y = x @ [W_0; W_1; ...]^T."""

    def __init__(self, in_features: int, output_sizes: dict[str, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(output_sizes.values()), bias=bias)
        self.output_sizes = dict(output_sizes)
        self.shard_names = tuple(output_sizes)
        self.offsets: dict[str, int] = {}
        offset = 0
        for name, size in output_sizes.items():
            self.offsets[name] = offset
            offset += size

    def shard(self, param: torch.Tensor, name: str) -> torch.Tensor:
        """The rows of param (this layer's weight or bias) that projection `name` owns."""
        return param.narrow(0, self.offsets[name], self.output_sizes[name])

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return y.split(list(self.output_sizes.values()), dim=-1)


def qkv_linear(hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool) -> MergedLinear:
    return MergedLinear(hidden_size, {"q": num_heads * head_dim, "k": num_kv_heads * head_dim,
                                      "v": num_kv_heads * head_dim}, bias=bias)


def gate_up_linear(hidden_size: int, intermediate_size: int, bias: bool) -> MergedLinear:
    return MergedLinear(hidden_size, {"gate": intermediate_size, "up": intermediate_size}, bias=bias)
