"""The Triton attention kernels with per-layer KV-cache scales (serval.layers.quant.kv_scales) against the torch
reference: a float8 cache holding k / k_scale and v / v_scale, written and read back, for prefill and mixed
batches and for split-K decode. In Triton's interpreter on CPU, compiled on a GPU."""
from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

from serval.kernels import paged_attention as reference  # noqa: E402
from serval.kernels import triton_attention  # noqa: E402
from tests.kernels.test_triton_attention import DEVICE, FP8, random_step  # noqa: E402


def scales(k: float, v: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(k, device=DEVICE), torch.tensor(v, device=DEVICE)


@pytest.mark.parametrize("spans, block_size", [
    ([(0, 23), (9, 14), (0, 1), (30, 31)], 4),  # prefill, a later chunk and decode rows in one batch
    ([(n - 1, n) for n in (1, 17, 130, 64)], 16),  # decode only: split-K, partial outputs combined
])
def test_scaled_cache_reads_match_reference(spans, block_size):
    rng = random.Random(len(spans))
    kv_cache, metadata = random_step(rng, spans, 2, 32, block_size=block_size, dtype=FP8)
    query = torch.randn(metadata.query_start_loc[-1], 4, 32, device=DEVICE)
    k_scale, v_scale = scales(3.5, 0.25)
    expected = reference.paged_attention(query, kv_cache, metadata, 32 ** -0.5, k_scale=k_scale, v_scale=v_scale)
    unscaled = reference.paged_attention(query, kv_cache, metadata, 32 ** -0.5)
    out = torch.full_like(query, float("nan"))
    triton_attention.paged_attention(query, kv_cache, metadata, 32 ** -0.5, out=out, k_scale=k_scale,
                                     v_scale=v_scale)
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)
    assert (out - unscaled).abs().max() > 0.1  # the scales were applied, not ignored


def test_scaled_write_matches_reference_byte_for_byte():
    torch.manual_seed(0)
    key, value = 900 * torch.randn(11, 2, 16, device=DEVICE), 40 * torch.randn(11, 2, 16, device=DEVICE)
    slots = torch.tensor(random.Random(1).sample(range(48), 11), device=DEVICE)
    k_scale, v_scale = scales(10.0, 0.5)
    caches = [torch.zeros(2, 3, 16, 2, 16, dtype=FP8, device=DEVICE) for _ in range(2)]
    reference.write_kv(caches[0], key, value, slots, k_scale=k_scale, v_scale=v_scale)
    triton_attention.write_kv(caches[1], key, value, slots, k_scale=k_scale, v_scale=v_scale)
    assert torch.equal(caches[0].view(torch.uint8), caches[1].view(torch.uint8))
    # Stored divided: keys of up to about 3600 / 10 fit float8's 448, each within its 3-bit mantissa's rounding.
    stored = caches[0][0].view(-1, 2, 16)[slots].float() * 10.0
    assert ((stored - key).abs() <= 0.07 * key.abs() + 0.1).all()
