"""The Triton GEMV against x @ W.T (interpreter on CPU, compiled on GPU)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from serval.kernels import triton_gemv  # noqa: E402
from serval.layers.activation import silu_and_mul  # noqa: E402
from serval.layers.linear import Linear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n, k", [(37, 256), (37, 96), (8, 1024), (5, 40)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_matmul(dtype, n, k, with_bias):
    # 37 rows: not a multiple of any BLOCK_N; k=96 and 40: not multiples of BLOCK_K, so the masked path runs.
    torch.manual_seed(n * k)
    x = torch.randn(1, k, device=DEVICE, dtype=dtype)
    weight = torch.randn(n, k, device=DEVICE, dtype=dtype)
    bias = torch.randn(n, device=DEVICE, dtype=dtype) if with_bias else None
    expected = x.float() @ weight.float().T + (bias.float() if with_bias else 0)
    for config in [None, (4, 64, 2), (16, 32, 4)]:
        y = triton_gemv.gemv(x, weight, bias, config=config)
        assert y.shape == (1, n) and y.dtype == dtype
        tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(y.float(), expected, **tolerance)


def test_gemv_reads_a_strided_weight_view():
    # Rows of a larger matrix (a shard of a merged projection): stride(0) is not K.
    torch.manual_seed(3)
    big = torch.randn(12, 130, device=DEVICE)
    weight = big[2:9, :128]
    x = torch.randn(1, 128, device=DEVICE)
    torch.testing.assert_close(triton_gemv.gemv(x, weight), x @ weight.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k", [128, 72])
def test_gated_gemv_is_down_of_silu_and_mul(dtype, k):
    torch.manual_seed(k)
    gate_up = torch.randn(1, 2 * k, device=DEVICE, dtype=dtype)
    weight = torch.randn(19, k, device=DEVICE, dtype=dtype)
    activation = silu_and_mul(gate_up.cpu()).to(DEVICE)  # the torch reference, rounded to dtype as the model is
    expected = activation.float() @ weight.float().T
    for config in [None, (4, 32, 2)]:
        y = triton_gemv.gemv(gate_up, weight, config=config, gated=True)
        tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(y.float(), expected, **tolerance)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GEMV path is taken on CUDA only")
def test_linear_on_one_half_precision_row_agrees_with_cublas(monkeypatch):
    torch.manual_seed(4)
    layer = Linear(4096, 6144, bias=False).to("cuda", torch.bfloat16)
    torch.nn.init.normal_(layer.weight, std=0.02)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    ours = layer(x)
    down = Linear(2048, 4096, bias=False).to("cuda", torch.bfloat16)
    torch.nn.init.normal_(down.weight, std=0.02)
    gate_up = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    ours_down = down.forward_silu_and_mul(gate_up)
    monkeypatch.setenv("SERVAL_GEMV", "cublas")
    theirs = layer(x)
    torch.testing.assert_close(ours.float(), theirs.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ours_down.float(), down(silu_and_mul(gate_up)).float(), atol=2e-2, rtol=2e-2)
