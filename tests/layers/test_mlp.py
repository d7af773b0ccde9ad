"""GatedMLP against transformers' LlamaMLP, and its fused SwiGLU path (the Triton GEMV, here in the interpreter)
against the same layer run step by step."""
from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaMLP

from serval.layers.activation import silu_and_mul
from serval.layers.mlp import GatedMLP

# Triton's interpreter on CPU, the compiled kernel on a GPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_mlp(hidden_act: str, bias: bool, seed: int = 0) -> tuple[GatedMLP, LlamaMLP]:
    """Ours and transformers' with the same random weights (gate and up merged into ours)."""
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, hidden_act=hidden_act, mlp_bias=bias)
    torch.manual_seed(seed)
    theirs = LlamaMLP(config).eval()
    for param in theirs.parameters():
        torch.nn.init.normal_(param, std=0.1)
    ours = GatedMLP(64, 96, hidden_act, bias=bias)
    for name in ("weight", "bias") if bias else ("weight",):
        for shard, projection in (("gate", theirs.gate_proj), ("up", theirs.up_proj)):
            ours.gate_up_proj.shard(getattr(ours.gate_up_proj, name).data, shard).copy_(getattr(projection, name))
        getattr(ours.down_proj, name).data.copy_(getattr(theirs.down_proj, name))
    return ours, theirs


@pytest.mark.parametrize("hidden_act", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_transformers(hidden_act, bias):
    ours, theirs = random_mlp(hidden_act, bias)
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("quantized", [False, True])
def test_fused_swiglu_equals_the_unfused_layer(quantized, monkeypatch):
    """One half-precision row (batch-1 decode) takes the Triton GEMV with SiLU(gate) * up computed as it reads its
    input; the unfused layer runs act_and_mul and then the plain GEMV. float8 weights (quantization="fp8") too."""
    pytest.importorskip("triton")
    ours, _ = random_mlp("silu", bias=False, seed=1)
    ours = ours.to(DEVICE, torch.float16)
    if quantized:
        ours.gate_up_proj.quantize_fp8_()
        ours.down_proj.quantize_fp8_()
    x = torch.randn(1, 64, dtype=torch.float16).to(DEVICE)
    with torch.no_grad():
        reference = ours.down_proj(silu_and_mul(ours.gate_up_proj(x)))  # torch, on CPU
        monkeypatch.setenv("SERVAL_GEMV", "triton")
        fused = ours(x)
        unfused = ours.down_proj(silu_and_mul(ours.gate_up_proj(x)))
    assert fused.shape == (1, 64) and fused.dtype == torch.float16
    # The fused kernel keeps the activation in float32 where the unfused layer rounds it to float16 first.
    torch.testing.assert_close(fused, unfused, atol=2e-3, rtol=2e-3)
    if not quantized:  # float8 rows go through per-token activation quantization off the GEMV instead
        torch.testing.assert_close(unfused, reference, atol=2e-3, rtol=2e-3)
