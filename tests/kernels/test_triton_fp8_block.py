"""The block-scaled FP8 GEMM against the torch reference (dequantize both operands, matmul in float32), in the
interpreter on CPU: odd N, several K-groups, batch sizes 1 to 256; and the quantizers' block and group scales."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from serval.kernels import triton_fp8_block  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_weight_blocks_and_activation_groups_have_their_own_scales():
    torch.manual_seed(0)
    weight = torch.randn(200, 256) * torch.logspace(-2, 1, 256)[None, :]  # columns three decades apart
    q, scale = triton_fp8_block.quantize_weight_blocks(weight, 128, 128)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (200, 256) and scale.shape == (2, 2)
    torch.testing.assert_close(scale[1, 0], weight[128:, :128].abs().amax() / 448)
    dequantized = q.float() * scale.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)
    assert ((dequantized - weight).abs() <= weight.abs().amax() * 2 ** -4).all()
    x = torch.randn(3, 256)
    xq, x_scale = triton_fp8_block.quantize_groups(x, 128)
    assert x_scale.shape == (3, 2)
    torch.testing.assert_close(x_scale[:, 1], x[:, 128:].abs().amax(dim=1) / 448)


@pytest.mark.parametrize("m", [1, 7, 16, 33, 256])
@pytest.mark.parametrize("n, k", [(37, 256), (130, 384), (64, 128)])
def test_gemm_matches_the_reference(m, n, k):
    torch.manual_seed(m + n + k)
    x = torch.randn(m, k, device=DEVICE)
    wq, block_scale = triton_fp8_block.quantize_weight_blocks(torch.randn(n, k, device=DEVICE), 128, 128)
    w_scale = block_scale.repeat_interleave(128, 0)[:n].contiguous()
    xq, x_scale = triton_fp8_block.quantize_groups(x, 128)
    expected = triton_fp8_block.reference_linear(xq, x_scale, wq, w_scale, 128)
    got = triton_fp8_block.gemm(xq, x_scale, wq, w_scale, 128)
    assert got.shape == (m, n)
    # On Hopper the float8 tensor cores keep a narrower accumulator within each 128-long group.
    tolerance = dict(atol=1e-3, rtol=1e-3) if DEVICE == "cpu" else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(got, expected, **tolerance)
    # And close to the unquantized product: a few percent, not the answer.
    exact = x @ (wq.float() * w_scale.repeat_interleave(128, 1)).T
    assert (got - exact).norm() / exact.norm() < 0.05
