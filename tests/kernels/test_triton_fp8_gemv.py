"""The float8 GEMV's float16-products kernel (serval.kernels.triton_fp8_gemv) against the dequantized product in
float32, x @ (W * scale)^T, in Triton's interpreter on CPU (compiled on GPU); and its sm_90 SASS, compiled with no GPU.

Tolerance, from the kernel's arithmetic: a partial element takes one product a tile, and each product and each
add into it rounds to float16 (2^-11 relative to a value no larger than the sum of the |products| it holds; on the
GPU one fused rounding, in the interpreter two), so a row's error is at most 2 tiles 2^-11 sum_k |w_k x_k| (x's
power-of-two scale is exact both ways; the float32 flushes add nothing near it); the output rounds to x's dtype
(2^-11 or 2^-8 of |y|). Gated, the kernel's approximate sigmoid may round silu(g) u to
the neighbouring 16-bit value: one more unit of x's dtype per column."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from serval.kernels import triton_fp8_gemv, triton_gemv  # noqa: E402
from serval.layers import fp8  # noqa: E402
from serval.layers.activation import silu_and_mul  # noqa: E402
from tests.kernels.test_triton_w4a16_gemv import sm90_counts, sm90_tools_present  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
UNIT = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}  # half a unit in the last place, relative


def within_rounding(got: torch.Tensor, x: torch.Tensor, q_weight: torch.Tensor, weight_scale: torch.Tensor,
                    bias: torch.Tensor | None, gated: bool, tiles: int, rounded_apart: bool = False) -> None:
    """got against the float32 product, within the module docstring's bound, column by column. rounded_apart: the
    kernel's x may lie a unit of x's dtype from the given one (as gated)."""
    activation = silu_and_mul(x.cpu()).to(x.device) if gated else x
    weight = q_weight.float() * weight_scale[:, None]
    expected = activation.float() @ weight.T + (bias.float() if bias is not None else 0)
    magnitude = activation.float().abs() @ weight.abs().T  # sum_k |w_k x_k| per row
    bound = (2 * tiles * 2.0 ** -11 + (UNIT[x.dtype] if gated or rounded_apart else 0)) * magnitude \
        + UNIT[x.dtype] * expected.abs() + 1e-30
    error = (got.float() - expected).abs()
    assert torch.all(error <= bound), (error / bound).max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("n, k, config", [(37, 256, None), (37, 96, (4, 64, 2)), (5, 40, (2, 32, 2)),
                                          (19, 200, (8, 64, 4)), (37, 160, (16, 32, 4))])
def test_half_products_match_the_dequantized_product(dtype, gated, n, k, config):
    # 37 and 19 rows: not multiples of BLOCK_N; K 96, 40, 200: not multiples of BLOCK_K (the masked path).
    torch.manual_seed(n * k + gated)
    q_weight, weight_scale = fp8.quantize_weight(torch.randn(n, k, device=DEVICE))
    x = (torch.randn(1, 2 * k if gated else k, device=DEVICE) * 3).to(dtype)
    bias = torch.randn(n, device=DEVICE, dtype=dtype)
    got = triton_gemv.gemv(x, q_weight, bias, config=config, gated=gated, weight_scale=weight_scale,
                           half_products=True)
    assert got.shape == (1, n) and got.dtype == dtype
    block_k = min((config or triton_gemv.FP8_CONFIG)[1], 1 << (k - 1).bit_length())
    within_rounding(got, x, q_weight, weight_scale, bias, gated, tiles=-(-k // block_k))


# Triton's interpreter rounds float32 to bfloat16 other than to nearest (half of a normal sample lands elsewhere),
# unlike torch's add and multiply: bfloat16 is compared on a GPU.
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("config", [None, (4, 64, 2)])
def test_the_residual_added_out_and_the_norm_finished(dtype, gated, config):
    # The float16-products kernel in a block's chain (tests/kernels/test_triton_gemv.py's gemv_chain): h bit for
    # bit, the next norm's parts, and the product with RMSNorm(h) within the kernel's rounding of the reference's
    # normed row (whose two roundings to x's dtype the kernel's g h takes one of: a unit of x's dtype more).
    from tests.kernels.test_triton_gemv import gemv_chain
    chain = gemv_chain(dtype, True, gated, True, config)
    h = chain["h"]
    assert torch.equal(h, chain["expected_h"])
    assert torch.equal(chain["pending"].scaled, (chain["norm_weight"].float() * h.float()).to(dtype))
    block_k = min((config or triton_gemv.get_config(19, 37, True, h.device))[1], 64)  # capped at K's next power
    within_rounding(chain["y"], chain["normed"], chain["w2"], chain["s2"], chain["bias"], False,
                    tiles=-(-37 // block_k), rounded_apart=True)


@pytest.mark.parametrize("x_size", [3e4, 1e-6])
def test_x_far_outside_float16s_comfortable_range(x_size):
    # |x| 3e4 times |w| 448 is far past float16's 65504, and |x| 1e-6 lies in its subnormals (4 bits of precision):
    # the power-of-two scale of x keeps both as exact as the float32 path.
    torch.manual_seed(1)
    q_weight, weight_scale = fp8.quantize_weight(torch.randn(7, 128, device=DEVICE))
    x = (torch.randn(1, 128, device=DEVICE) * x_size).to(torch.bfloat16)
    got = triton_gemv.gemv(x, q_weight, config=(2, 64, 2), weight_scale=weight_scale, half_products=True)
    assert torch.isfinite(got).all()
    within_rounding(got, x, q_weight, weight_scale, None, False, tiles=2)


def test_partials_flushed_before_float16_overflows(monkeypatch):
    # The worst case of the range argument: every weight e4m3's largest (448) and every x just under a power of two
    # (scaled to 0.995), 150 tiles of 32: a float16 partial element summing them all would pass 65504; flushed
    # every FLUSH_TILES (128) tiles, it stays finite and exact to the bound. Flushing every 2 tiles, over a K that
    # leaves a last, partial chunk, checks the chunk loop's bounds.
    k = 150 * 32
    q_weight, weight_scale = fp8.quantize_weight(torch.ones(3, k, device=DEVICE))
    assert q_weight.float().max().item() == 448.0
    x = torch.full((1, k), 1.99, device=DEVICE, dtype=torch.bfloat16)
    got = triton_gemv.gemv(x, q_weight, config=(2, 32, 1), weight_scale=weight_scale, half_products=True)
    assert torch.isfinite(got).all()
    within_rounding(got, x, q_weight, weight_scale, None, False, tiles=triton_fp8_gemv.FLUSH_TILES)
    monkeypatch.setattr(triton_fp8_gemv, "FLUSH_TILES", 2)
    torch.manual_seed(2)
    q_weight, weight_scale = fp8.quantize_weight(torch.randn(5, 160, device=DEVICE))
    x = torch.randn(1, 320, device=DEVICE, dtype=torch.float16)
    got = triton_gemv.gemv(x, q_weight, config=(2, 32, 1), gated=True, weight_scale=weight_scale,
                           half_products=True)
    within_rounding(got, x, q_weight, weight_scale, None, True, tiles=2)


def test_float32_x_keeps_the_float32_path():
    # half_products applies to 16-bit x; float32 x has nothing to gain and keeps float32 products (to 1e-5).
    torch.manual_seed(3)
    q_weight, weight_scale = fp8.quantize_weight(torch.randn(9, 64, device=DEVICE))
    x = torch.randn(1, 64, device=DEVICE)
    got = triton_gemv.gemv(x, q_weight, weight_scale=weight_scale, half_products=True)
    torch.testing.assert_close(got, x @ (q_weight.float() * weight_scale[:, None]).T, atol=1e-5, rtol=1e-5)


def test_the_switch_on_gpus(monkeypatch):
    monkeypatch.delenv("SERVAL_FP8_GEMV_HALF", raising=False)
    assert triton_fp8_gemv.half_products_on_gpu()
    monkeypatch.setenv("SERVAL_FP8_GEMV_HALF", "0")
    assert not triton_fp8_gemv.half_products_on_gpu()


@pytest.mark.skipif(not sm90_tools_present(), reason="Triton's bundled ptxas and cuobjdump")
def test_float16_products_take_fewer_sm90_instructions_a_weight():
    # Compiled for sm_90 with its inline PTX, no GPU needed (in a process of its own: this one may run Triton's
    # interpreter). At the H200 table's (4, 2048, 4): 2.44 a weight against the float32 path's 3.48 when written;
    # gated (SwiGLU per tile, the down projection) 4.9 against 7.9.
    script = ("import json, sys; from benchmarks.gemv_bench import fp8_loop_instructions as count; "
              "json.dump([count((4, 2048, 4), gated, half) for gated in (False, True) for half in (False, True)], "
              "sys.stdout)")
    plain_before, plain_after, gated_before, gated_after = sm90_counts(script)
    assert plain_after["per_weight"] < 3.0 < plain_before["per_weight"]
    assert plain_after["opcodes"].get("HFMA2", 0) * 2 == plain_after["weights_per_thread"]  # two products each
    assert gated_after["per_weight"] < gated_before["per_weight"] - 2.5
    assert plain_after["stack_bytes"] == 0 and gated_after["stack_bytes"] == 0
