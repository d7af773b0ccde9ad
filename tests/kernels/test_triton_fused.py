"""The fused Triton kernels against their torch references in serval.layers (interpreter on CPU, compiled on GPU)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from serval.kernels import paged_attention, triton_fused  # noqa: E402
from serval.layers.activation import silu_and_mul  # noqa: E402
from serval.layers.norm import rms_norm  # noqa: E402
from serval.layers.rotary import RotaryEmbedding, apply_rotary  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]


def reference_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype, with_residual):
    torch.manual_seed(0)
    x = torch.randn(5, 96, device=DEVICE, dtype=dtype)  # 96: not a power of two, so the mask matters
    residual = torch.randn_like(x) if with_residual else None
    weight = torch.randn(96, device=DEVICE, dtype=dtype)
    expected, expected_residual = rms_norm(x.cpu(), None if residual is None else residual.cpu(), weight.cpu(), 1e-5)
    out, new_residual = triton_fused.rms_norm(x, residual, weight, 1e-5)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out.cpu(), expected, **tolerance)
    torch.testing.assert_close(new_residual.cpu(), expected_residual, **tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_in_place_on_qkv_views_matches_reference(dtype):
    torch.manual_seed(1)
    num_heads, num_kv_heads, head_dim = 6, 2, 32
    rotary = RotaryEmbedding(head_dim, 64, {"rope_type": "default", "rope_theta": 10000.0}).to(DEVICE)
    qkv = torch.randn(7, (num_heads + 2 * num_kv_heads) * head_dim, device=DEVICE, dtype=dtype)
    q, k, _ = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k = q.view(7, num_heads, head_dim), k.view(7, num_kv_heads, head_dim)
    positions = torch.tensor([0, 3, 63, 1, 17, 17, 40], device=DEVICE)
    cos, sin = rotary.cos_cache[positions].cpu(), rotary.sin_cache[positions].cpu()
    expected_q, expected_k = apply_rotary(q.cpu(), cos, sin), apply_rotary(k.cpu(), cos, sin)
    before_v = qkv[:, (num_heads + num_kv_heads) * head_dim:].clone()
    triton_fused.rotary_(positions, q, k, rotary.cos_cache, rotary.sin_cache)
    torch.testing.assert_close(q.cpu(), expected_q, atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(k.cpu(), expected_k, atol=1e-5, rtol=1e-3)
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim:], before_v)  # v untouched


@pytest.mark.parametrize("dtype,kv_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                            (torch.float16, torch.float8_e4m3fn)])
def test_rotary_with_kv_write_matches_rotary_then_write_kv(dtype, kv_dtype):
    """The fused kernel against the two references in sequence: apply_rotary, then paged_attention.write_kv
    (of the key as the kernel rotated it, so the cache must match byte for byte, float8 included, where a value
    past 448 saturates); a padding row (slot -1) writes nothing, and the rest of the cache keeps its poison."""
    torch.manual_seed(5)
    num_heads, num_kv_heads, head_dim, block_size = 6, 2, 32, 4
    rotary = RotaryEmbedding(head_dim, 64, {"rope_type": "default", "rope_theta": 10000.0}).to(DEVICE)
    qkv = torch.randn(5, (num_heads + 2 * num_kv_heads) * head_dim, device=DEVICE, dtype=dtype)
    qkv[0, -1], qkv[3, -2] = 1000.0, -600.0  # in v
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k, v = (t.view(5, -1, head_dim) for t in (q, k, v))
    positions = torch.tensor([0, 9, 33, 2, 5], device=DEVICE)
    slot_mapping = torch.tensor([13, 2, -1, 30, 7], device=DEVICE)
    kv_cache = torch.full((2, 10, block_size, num_kv_heads, head_dim), 7.0, device=DEVICE).to(kv_dtype)
    cos, sin = rotary.cos_cache[positions].cpu(), rotary.sin_cache[positions].cpu()
    expected_q, expected_k = apply_rotary(q.cpu(), cos, sin), apply_rotary(k.cpu(), cos, sin)
    expected_cache = kv_cache.cpu().clone()
    triton_fused.rotary_(positions, q, k, rotary.cos_cache, rotary.sin_cache, v, kv_cache, slot_mapping)
    torch.testing.assert_close(q.cpu(), expected_q, atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(k.cpu(), expected_k, atol=1e-5, rtol=1e-3)
    real = slot_mapping.cpu() >= 0  # the reference has no padding rows
    paged_attention.write_kv(expected_cache, k.cpu()[real], v.cpu()[real], slot_mapping.cpu()[real])
    assert torch.equal(kv_cache.cpu().view(torch.uint8), expected_cache.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_reference(dtype):
    torch.manual_seed(2)
    x = torch.randn(3, 2 * 1100, device=DEVICE, dtype=dtype)  # more than one 1024-column block, ragged
    out = triton_fused.silu_and_mul(x)
    assert out.shape == (3, 1100)
    expected = reference_silu_and_mul(x.cpu())
    torch.testing.assert_close(out.cpu(), expected, atol=2e-3, rtol=2e-3)
    if DEVICE == "cpu":
        torch.testing.assert_close(silu_and_mul(x.float()), reference_silu_and_mul(x.float()))
