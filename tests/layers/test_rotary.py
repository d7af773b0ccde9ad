"""Rotary embedding against transformers' own LlamaRotaryEmbedding + apply_rotary_pos_emb."""
from __future__ import annotations

import json
import types

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from serval.layers.rotary import RotaryEmbedding, apply_rotary, rope_parameters

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64, "rope_theta": 500000.0}


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    LLAMA3,
])
def test_matches_transformers(rope):
    config = transformers.LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, rope_parameters=dict(rope))
    head_dim = 32
    torch.manual_seed(0)
    positions = torch.tensor([0, 1, 2, 63, 64, 100, 257, 511, 5])  # flat: several requests' positions mixed
    q, k = torch.randn(len(positions), 4, head_dim), torch.randn(len(positions), 2, head_dim)

    hf_rope = LlamaRotaryEmbedding(config)
    cos, sin = hf_rope(q, positions[None])
    # HF layout is [batch, heads, seq, dim]; ours is flat [tokens, heads, dim].
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    ours = RotaryEmbedding(head_dim, config.max_position_embeddings, rope_parameters(config))
    got_q, got_k = ours(positions, q, k)
    torch.testing.assert_close(got_q, hf_q[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k, hf_k[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_rotation_preserves_norm_and_relative_position():
    rope = RotaryEmbedding(16, 128, {"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 16), torch.randn(1, 1, 16)
    dots = []
    for offset in (0, 7, 50):
        rq, _ = rope(torch.tensor([offset + 5]), q, k)
        _, rk = rope(torch.tensor([offset + 2]), q, k)
        torch.testing.assert_close(rq.norm(), q.norm())
        dots.append((rq * rk).sum())
    # q.k after rotation depends only on the distance between positions.
    torch.testing.assert_close(dots[0], dots[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dots[0], dots[2], atol=1e-4, rtol=1e-4)


def test_half_precision_input_keeps_dtype():
    rope = RotaryEmbedding(8, 32, {"rope_type": "default", "rope_theta": 10000.0})
    x = torch.randn(3, 2, 8)
    out = apply_rotary(x.bfloat16(), rope.cos_cache[[1, 2, 3]], rope.sin_cache[[1, 2, 3]])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), apply_rotary(x, rope.cos_cache[[1, 2, 3]], rope.sin_cache[[1, 2, 3]]),
                               atol=3e-2, rtol=3e-2)


def test_rope_parameters_reads_both_spellings(tmp_path):
    old = types.SimpleNamespace(rope_theta=500000.0, rope_scaling={k: v for k, v in LLAMA3.items()
                                                                    if k not in ("rope_type", "rope_theta")} | {
        "type": "llama3"})
    assert rope_parameters(old) == LLAMA3
    assert rope_parameters(types.SimpleNamespace()) == {"rope_type": "default", "rope_theta": 10000.0}
    # An old config.json (rope_theta + rope_scaling) read by the installed transformers.
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "rope_theta": 500000.0,
        "rope_scaling": {k: v for k, v in LLAMA3.items() if k != "rope_theta"}}))
    params = rope_parameters(transformers.AutoConfig.from_pretrained(tmp_path))
    assert {k: params[k] for k in LLAMA3} == LLAMA3


def test_unsupported_rope_type_is_named():
    with pytest.raises(ValueError, match="'dynamic'.*supported"):
        RotaryEmbedding(8, 32, {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ValueError, match="'yarn' needs \\['original_max_position_embeddings'\\]"):
        RotaryEmbedding(8, 32, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0})


@pytest.mark.parametrize("rope", [
    # gpt-oss: attention factor from the stretch factor, no truncation of the ramp
    {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
     "original_max_position_embeddings": 64, "rope_theta": 150000.0},
    # DeepSeek-V3: mscale / mscale_all_dim, truncated ramp
    {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1,
     "original_max_position_embeddings": 64, "rope_theta": 10000.0}])
def test_yarn_tables_equal_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
                                      rope_parameters=dict(rope))
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    rotary = RotaryEmbedding(16, 256, rope_parameters(config))
    freqs = torch.outer(torch.arange(256).float(), inv_freq)
    torch.testing.assert_close(rotary.cos_cache, freqs.cos() * attention_factor, atol=1e-6, rtol=0)
    torch.testing.assert_close(rotary.sin_cache, freqs.sin() * attention_factor, atol=1e-6, rtol=0)
    assert attention_factor != 1.0
