"""The W4A16 Triton kernels (GEMV for decode rows, GEMM for prefill) against the torch reference, dequantize then
matmul (interpreter on CPU, compiled on GPU): odd shapes, group boundaries, act-order, batch sizes 1 to 256."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from serval.kernels import triton_w4a16  # noqa: E402
from serval.layers.quant.w4a16 import AWQ_ORDER, pack_int4, unpack_int4  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 x on a GPU: the GEMM's tl.dot runs on tf32 tensor cores (10-bit mantissa), as cuBLAS may.
FLOAT32 = dict(atol=1e-3, rtol=1e-3) if DEVICE == "cpu" else dict(atol=5e-2, rtol=1e-2)


def random_layout(k: int, n: int, group: int, act_order: bool, seed: int, symmetric: bool = False):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=generator)
    groups = k // group
    scales = torch.rand(groups, n, generator=generator) * 0.1 + 0.01
    zeros = torch.randint(0, 16, (groups, n), generator=generator).to(torch.uint8)
    if symmetric:  # AWQ/GPTQ sym and compressed-tensors' symmetric W4A16 store no zeros: 8 for all
        zeros = torch.full_like(zeros, 8)
    g_idx = torch.arange(k) // group
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=generator)]
    return (pack_int4(q, 0).to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), g_idx.int().to(DEVICE), q)


@pytest.mark.parametrize("m", [1, 3, 4, 5, 33, 256])
@pytest.mark.parametrize("k, n, group, act_order", [(256, 40, 128, False), (384, 72, 128, True), (96, 24, 32, True),
                                                    (64, 8, 64, False)])
def test_kernels_match_the_reference(m, k, n, group, act_order):
    # n=40, 72, 24: not multiples of BLOCK_N; k=96 and 384: not multiples of the GEMV's BLOCK_K (masked tail);
    # m=4/5: either side of GEMV_MAX_ROWS; 33 and 256: partial and many GEMM row blocks.
    qweight, scales, zeros, g_idx, q = random_layout(k, n, group, act_order, seed=m * k + n)
    x = torch.randn(m, k, device=DEVICE)
    expected = triton_w4a16.reference_linear(x, qweight, scales, zeros, g_idx)
    w = (q.to(DEVICE) - zeros[g_idx.long()].long()).float() * scales[g_idx.long()]
    torch.testing.assert_close(expected, x @ w, atol=1e-4, rtol=1e-4)  # the reference is what the layout means
    got = triton_w4a16.matmul(x, qweight, scales, zeros, g_idx)
    assert got.shape == (m, n) and got.dtype == x.dtype
    torch.testing.assert_close(got, expected, **FLOAT32)


@pytest.mark.parametrize("m", [1, 20])
def test_half_precision_and_other_configs(m):
    qweight, scales, zeros, g_idx, _ = random_layout(256, 48, 128, False, seed=5)
    x = torch.randn(m, 256, device=DEVICE, dtype=torch.float16)
    expected = triton_w4a16.reference_linear(x, qweight, scales.half(), zeros, g_idx)
    got = triton_w4a16.matmul(x, qweight, scales.half(), zeros, g_idx, gemv_config=(16, 64, 2),
                              gemm_config=(16, 32, 32, 2))
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)


def test_packing_orders_round_trip():
    values = torch.randint(0, 16, (16, 24))
    for order in (tuple(range(8)), AWQ_ORDER):
        for dim in (0, 1):
            packed = pack_int4(values, dim, order)
            assert packed.dtype == torch.int32 and packed.shape[dim] * 8 == values.shape[dim]
            assert torch.equal(unpack_int4(packed, dim, order), values)
    # AWQ's order: the word's second nibble holds the third column.
    word = pack_int4(torch.arange(8)[None], 1, AWQ_ORDER)
    assert (int(word) >> 4) & 0xF == 2


@pytest.mark.parametrize("m", [4, 5, 70])
@pytest.mark.parametrize("k, n, group", [(256, 40, 128), (512, 72, 64), (128, 8, 128)])
def test_grouped_kernels_match_the_reference(m, k, n, group):
    # Groups in order (AWQ, GPTQ without act-order, compressed-tensors): the kernels that read one scale row per
    # tile. n=40, 72: partial column blocks; m=4/5: either side of GEMV_MAX_ROWS (one row: the split-K test below);
    # 70: a partial GEMM row block.
    qweight, scales, zeros, g_idx, _ = random_layout(k, n, group, False, seed=m + k + n)
    assert triton_w4a16.groups_in_order(g_idx, k // group) == group
    x = torch.randn(m, k, device=DEVICE)
    expected = triton_w4a16.reference_linear(x, qweight, scales, zeros, g_idx)
    for gemv_config, gemm_config in [(None, None), ((16, 64, 2, 1, 1), (16, 32, 32, 2)),
                                     ((8, 256, 0, 4, 1), (32, 64, 128, 4))]:
        got = triton_w4a16.matmul(x, qweight, scales, zeros, g_idx, gemv_config=gemv_config,
                                  gemm_config=gemm_config, group_size=group)
        torch.testing.assert_close(got, expected, **FLOAT32)


def test_act_order_is_not_groups_in_order():
    _, _, _, g_idx, _ = random_layout(384, 8, 128, True, seed=2)
    assert triton_w4a16.groups_in_order(g_idx, 3) is None
