"""The Triton GEMV against x @ W.T (interpreter on CPU, compiled on GPU)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from serval.kernels import triton_gemv  # noqa: E402
from serval.layers import fp8  # noqa: E402
from serval.layers.activation import silu_and_mul  # noqa: E402
from serval.layers.linear import Linear  # noqa: E402
from serval.layers.norm import rms_norm  # noqa: E402

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


@pytest.mark.parametrize("half_products", [False, True])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("k", [256, 96])
def test_fp8_weights_with_row_scales(gated, k, half_products):
    # quantization="fp8": W is float8 e4m3 and row n of the product is scaled by weight_scale[n]; the float32 path
    # and the float16-products one (serval.kernels.triton_fp8_gemv, which has its own tests).
    torch.manual_seed(k + gated)
    q_weight, weight_scale = fp8.quantize_weight(torch.randn(37, k, device=DEVICE))
    x = torch.randn(1, 2 * k if gated else k, device=DEVICE, dtype=torch.float16)
    activation = silu_and_mul(x.cpu()).to(DEVICE) if gated else x
    expected = activation.float() @ (q_weight.float() * weight_scale[:, None]).T
    for config in [None, (4, 64, 2)]:
        y = triton_gemv.gemv(x, q_weight, config=config, gated=gated, weight_scale=weight_scale,
                             half_products=half_products)
        assert y.dtype == torch.float16
        torch.testing.assert_close(y.float(), expected, atol=2e-2, rtol=2e-2)


def gemv_chain(dtype, scaled: bool, gated: bool, half_products: bool, config, n: int = 37, k: int = 128) -> dict:
    """A block's two GEMVs at batch 1 with the norm between them left pending: h = W1 x + residual, then
    y = W2 RMSNorm(h) + bias. Returns them, their operands and the torch references (expected_h: the plain GEMV
    plus the residual; normed: serval.layers.norm.rms_norm of h)."""
    torch.manual_seed(n + gated + 2 * scaled)

    def weight(rows, columns):
        w = torch.randn(rows, columns, device=DEVICE)
        return fp8.quantize_weight(w) if scaled else (w.to(dtype), None)
    (w1, s1), (w2, s2) = weight(n, k), weight(19, n)
    x = torch.randn(1, 2 * k if gated else k, device=DEVICE, dtype=dtype)
    residual = (torch.randn(1, n, device=DEVICE) * 8).to(dtype)
    norm_weight = (torch.rand(n, device=DEVICE) + 0.5).to(dtype)
    bias = torch.randn(19, device=DEVICE, dtype=dtype)
    h, pending = triton_gemv.gemv_add_norm(x, w1, residual, norm_weight, 1e-5, config=config, gated=gated,
                                           weight_scale=s1, half_products=half_products)
    y = triton_gemv.gemv(None, w2, bias, config=config, weight_scale=s2, half_products=half_products,
                         normed=pending)
    plain = triton_gemv.gemv(x, w1, config=config, gated=gated, weight_scale=s1, half_products=half_products)
    normed, _ = rms_norm(h.cpu(), None, norm_weight.cpu(), 1e-5)
    return dict(h=h, pending=pending, y=y, expected_h=plain + residual, normed=normed.to(DEVICE),
                norm_weight=norm_weight, w2=w2, s2=s2, bias=bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("config", [None, (4, 64, 2), (16, 32, 4)])
def test_a_gemv_adds_the_residual_and_the_next_finishes_the_norm(dtype, gated, scaled, config):
    # The residual stream h, the next norm's weight-scaled row and sums of squares (37 rows: the last program's
    # rows past N must add nothing), then the product with RMSNorm(h) (serval.layers.norm.rms_norm the reference);
    # float8 weights on the float32 path here, the float16-products kernel in test_triton_fp8_gemv.py.
    chain = gemv_chain(dtype, scaled, gated, False, config)
    h, pending = chain["h"], chain["pending"]
    block_n = (config or triton_gemv.get_config(37, 128, scaled, h.device))[0]
    assert h.dtype == dtype and pending.square_sums.shape == (-(-37 // block_n),)
    if dtype == torch.float32:  # y * scale + residual may be one fused multiply-add on a GPU
        torch.testing.assert_close(h, chain["expected_h"], atol=1e-5, rtol=1e-5)
    else:  # the rounded product plus the stream, rounded again: bit for bit
        assert torch.equal(h, chain["expected_h"])
    assert torch.equal(pending.scaled, (chain["norm_weight"].float() * h.float()).to(dtype))
    torch.testing.assert_close(pending.square_sums.sum(), h.float().square().sum(), atol=0, rtol=1e-5)
    w2 = chain["w2"].float() * chain["s2"][:, None] if scaled else chain["w2"].float()
    expected_y = chain["normed"].float() @ w2.T + chain["bias"].float()
    # float16: the kernel keeps RMSNorm(h) unrounded but for g h where the reference rounds it twice.
    tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(chain["y"].float(), expected_y, **tolerance)


def bf16_layer(in_features: int, out_features: int) -> Linear:
    layer = Linear(in_features, out_features, bias=False).to("cuda", torch.bfloat16)
    torch.nn.init.normal_(layer.weight, std=0.02)
    return layer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GEMV path is taken on CUDA only")
def test_linear_on_one_half_precision_row_agrees_with_cublas(monkeypatch):
    torch.manual_seed(4)
    layer = bf16_layer(4096, 6144)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    ours = layer(x)
    down = bf16_layer(2048, 4096)
    gate_up = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    ours_down = down.forward_silu_and_mul(gate_up)
    monkeypatch.setenv("SERVAL_GEMV", "cublas")
    theirs = layer(x)
    torch.testing.assert_close(ours.float(), theirs.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ours_down.float(), down(silu_and_mul(gate_up)).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the float8 GEMM and the GEMV run on CUDA only")
def test_fp8_linear_one_row_agrees_with_the_fp8_gemm(monkeypatch):
    # Batch 1 takes the GEMV over float8 weights (x unquantized), more rows take torch._scaled_mm (x quantized per
    # token): both approximate the bf16 product, and each other, within fp8's rounding.
    torch.manual_seed(5)
    layer = bf16_layer(4096, 6144)
    x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    exact = layer(x).float()
    layer.quantize_fp8_()
    batched = layer(x).float()
    single = torch.cat([layer(x[i:i + 1]) for i in range(4)]).float()
    for got in (batched, single):
        assert (got - exact).norm() / exact.norm() < 0.05
    assert (single - batched).norm() / exact.norm() < 0.05
    # The float8 GEMM's fast accumulation (the default) against promotion to float32: far below fp8's own error.
    monkeypatch.setenv("SERVAL_FP8_FAST_ACCUM", "0")
    assert (layer(x).float() - batched).norm() / exact.norm() < 0.01


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("k, config", [(512, None), (384, (4, 256, 2)), (256, (2, 128, 4))])
def test_block_scaled_fp8_gemv(gated, k, config):
    # Block FP8 (scales per row and 128 columns, as serval.layers.quant.fp8 keeps them): k=384 with BLOCK_K 256 is
    # a partial last tile whose second group lies past K.
    from serval.kernels.triton_fp8_block import quantize_weight_blocks
    torch.manual_seed(k + gated)
    q_weight, block_scale = quantize_weight_blocks(torch.randn(37, k, device=DEVICE), 128, 128)
    per_row = block_scale.repeat_interleave(128, dim=0)[:37].contiguous()
    bias = torch.randn(37, device=DEVICE, dtype=torch.float16)
    x = torch.randn(1, 2 * k if gated else k, device=DEVICE, dtype=torch.float16)
    activation = silu_and_mul(x.cpu()).to(DEVICE) if gated else x
    expected = activation.float() @ (q_weight.float() * per_row.repeat_interleave(128, dim=1)).T + bias.float()
    y = triton_gemv.block_scaled_gemv(x, q_weight, per_row, 128, bias, config=config, gated=gated)
    assert y.dtype == torch.float16 and y.shape == (1, 37)
    torch.testing.assert_close(y.float(), expected, atol=3e-2, rtol=2e-2)
