"""The GGUF Triton kernels (GEMV for decode rows, GEMM beyond) against gguf's own dequantizer followed by a float32
matmul (interpreter on CPU, compiled on GPU): every supported type, odd output counts, several blocks per row, K
not a multiple of the tile, batch sizes 1, 3, 16 and 64."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from serval.kernels import triton_gguf  # noqa: E402

Q = gguf.GGMLQuantizationType
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 x on a GPU: the GEMM's tl.dot runs on tf32 tensor cores (10-bit mantissa), as cuBLAS may.
FLOAT32 = dict(atol=1e-3, rtol=1e-3) if DEVICE == "cpu" else dict(atol=5e-2, rtol=1e-2)
# gguf.quants writes these from float weights; the K-quants it only reads, so they get random bytes.
QUANTIZABLE = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
# Byte offsets of each K-quant block's fp16 scales: random bytes there would give inf/nan.
FP16_FIELDS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def gguf_rows(qtype: Q, n: int, k: int, seed: int) -> np.ndarray:
    """GGUF data uint8 [n, bytes per row] for an [n, k] weight."""
    rng = np.random.default_rng(seed)
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(rng.normal(0, 0.5, size=(n, k)).astype(np.float32), qtype)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n * k // block_size, type_size), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        raw[:, offset:offset + 2] = rng.uniform(-0.01, 0.01, size=len(raw)).astype(np.float16) \
            .view(np.uint8).reshape(-1, 2)
    return raw.reshape(n, -1)


def gguf_reference(raw: np.ndarray, qtype: Q) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32))


def shapes_for(qtype: Q) -> list[tuple[int, int]]:
    """(N, K): N not a multiple of the tile's outputs; K several blocks, not a multiple of the default BLOCK_K."""
    if triton_gguf.block_size(qtype) == 256:
        return [(40, 768), (7, 256)]
    return [(40, 96), (24, 288)]


@pytest.mark.parametrize("qtype", triton_gguf.SUPPORTED_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 3, 16, 64])
def test_kernels_match_gguf_s_dequantize_then_matmul(qtype, m):
    for n, k in shapes_for(qtype):
        raw = gguf_rows(qtype, n, k, seed=n + k)
        weight = gguf_reference(raw, qtype)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        blocks = torch.from_numpy(raw).to(DEVICE)
        got = triton_gguf.matmul(x.to(DEVICE), blocks, qtype)
        assert got.shape == (m, n) and got.dtype == torch.float32
        expected = x @ weight.t()
        scale = float(expected.abs().max())
        torch.testing.assert_close(got.cpu(), expected, atol=FLOAT32["atol"] * scale, rtol=FLOAT32["rtol"])
        # The module's own reference (serval's numpy dequantizers) is the same weight.
        torch.testing.assert_close(triton_gguf.reference_linear(x, blocks, qtype).cpu(), expected,
                                   atol=1e-5 * scale, rtol=1e-5)


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 5, 20])
def test_other_tile_configs_and_half_precision(qtype, m):
    n, k = 40, 512
    raw = gguf_rows(qtype, n, k, seed=3)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).half()
    expected = x.float() @ gguf_reference(raw, qtype).t()
    blocks = torch.from_numpy(raw).to(DEVICE)
    for gemv_config, gemm_config in [((8, 256, 2), (16, 16, 256, 2)), ((32, 512, 4), (32, 64, 512, 4))]:
        got = triton_gguf.matmul(x.to(DEVICE), blocks, qtype, gemv_config=gemv_config, gemm_config=gemm_config)
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.float().cpu(), expected, atol=1e-2 * float(expected.abs().max()),
                                   rtol=1e-2)


def test_bytes_per_weight_are_the_file_s():
    assert triton_gguf.bytes_per_weight(Q.Q4_K) == 144 / 256
    assert triton_gguf.bytes_per_weight(Q.Q4_1) == 20 / 32
    assert triton_gguf.row_bytes(Q.Q6_K, 512) == 2 * 210


def test_unsupported_types_and_split_blocks_are_refused():
    x = torch.zeros(1, 256, device=DEVICE)
    with pytest.raises(ValueError, match="Q2_K has no GPU kernel"):
        triton_gguf.matmul(x, torch.zeros(4, 84, dtype=torch.uint8, device=DEVICE), Q.Q2_K)
    blocks = torch.zeros(4, triton_gguf.row_bytes(Q.Q4_K, 256), dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match="BLOCK_K=128 splits GGUF blocks of 256"):
        triton_gguf.matmul(x, blocks, Q.Q4_K, gemv_config=(16, 128, 4))


@pytest.mark.parametrize("config", [None, (8, 2), (32, 4)])
def test_batch_1_q4_k_kernel_equals_the_reference_in_half_precision(config):
    n, k = 40, 768  # 40 outputs: a partial column block for every BLOCK_N here; three super-blocks per row
    raw = gguf_rows(Q.Q4_K, n, k, seed=11)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(0)).half()
    expected = x.float() @ gguf_reference(raw, Q.Q4_K).t()
    got = triton_gguf.q4_k_gemv(x.to(DEVICE), torch.from_numpy(raw).to(DEVICE), config)
    assert got.shape == (1, n) and got.dtype == torch.float16
    torch.testing.assert_close(got.float().cpu(), expected, atol=1e-2 * float(expected.abs().max()), rtol=1e-2)
