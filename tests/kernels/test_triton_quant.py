"""The Triton per-token fp8 quantization against its torch reference (interpreter on CPU, compiled on GPU)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from serval.kernels import triton_quant  # noqa: E402
from serval.layers import fp8  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(x: torch.Tensor, gated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # fp8.quantize_rows takes the Triton path for CUDA tensors: the reference runs on the CPU copy.
    q, scale = fp8.quantize_rows(x.cpu(), gated)
    return q.to(x.device), scale.to(x.device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [64, 200])  # 200: not a power of two, so the row is masked
def test_rows_match_the_reference_bit_for_bit(dtype, k):
    torch.manual_seed(k)
    x = torch.randn(6, k, device=DEVICE) * torch.logspace(-4, 3, 6, device=DEVICE)[:, None]
    x[2] = 0.0  # a row of zeros: the minimum scale, zeros out
    x = x.to(dtype)
    q, scale = triton_quant.quantize_rows(x)
    expected_q, expected_scale = reference(x, gated=False)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (6, 1)
    torch.testing.assert_close(scale, expected_scale, atol=0, rtol=0)
    assert torch.equal(q.view(torch.uint8), expected_q.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_rows_quantize_silu_and_mul(dtype):
    torch.manual_seed(5)
    gate_up = torch.randn(4, 2 * 96, device=DEVICE).to(dtype)
    q, scale = triton_quant.quantize_rows(gate_up, gated=True)
    expected_q, expected_scale = reference(gate_up, gated=True)
    assert q.shape == (4, 96)
    # silu is computed in float32 by both, but the kernel rounds silu(gate) * up once and the reference twice
    # (silu(gate) to dtype, then the product): the values agree to within a step of dtype and of e4m3.
    torch.testing.assert_close(scale, expected_scale, rtol=1e-2, atol=0)
    torch.testing.assert_close(q.float() * scale, expected_q.float() * expected_scale,
                               rtol=2 ** -3, atol=2 * expected_scale.max().item())


def test_rounding_to_e4m3_is_torchs_cast_for_every_kind_of_value():
    # Every finite float8 value exactly, and values between them: halfway ties, carries into the next binade,
    # subnormals (below 2^-6), across the whole range.
    torch.manual_seed(6)
    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    every = every[torch.isfinite(every)]
    between = (every[1:] + every[:-1]) / 2
    spread = torch.randn(4000) * torch.logspace(-5, 2.6, 4000)
    x = torch.cat([every, between[between.abs() < 448], spread.clamp(-448, 448)]).to(DEVICE)
    width = 8192
    x = torch.cat([x, torch.zeros(width - len(x), device=DEVICE)])[None]
    q, scale = triton_quant.quantize_rows(x)
    # The row's maximum is 448, so the scale is 1 and the kernel's float8 values are its rounding of x itself.
    assert scale.item() == 1.0
    assert torch.equal(q.view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8))


def test_no_rows():
    q, scale = triton_quant.quantize_rows(torch.empty(0, 32, device=DEVICE))
    assert q.shape == (0, 32) and scale.shape == (0, 1)
