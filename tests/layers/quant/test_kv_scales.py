"""Per-layer KV-cache scales for a float8 cache: the checkpoint names vLLM reads, and a checkpoint whose keys and
values exceed float8's range decoding closer to transformers with its scales than with 1.0."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from serval import LLM, SamplingParams
from serval.layers.attention import Attention, AttentionMetadata
from serval.layers.quant.kv_scales import (KVScaleName, calculate_kv_scales, parse_kv_scale_name,
                                           take_kv_scales)
from tests.conftest import build_tiny_model

# Keys and values this many times larger than the tiny model's (about 1): far past float8 e4m3's 448.
GROWTH = 1000.0


@pytest.mark.parametrize("name, expected", [
    ("model.layers.0.self_attn.k_scale", KVScaleName("model.layers.0.self_attn", "k")),  # llm-compressor, vLLM
    ("model.layers.0.self_attn.attn.v_scale", KVScaleName("model.layers.0.self_attn", "v")),
    ("model.layers.3.self_attn.k_proj.k_scale", KVScaleName("model.layers.3.self_attn", "k")),  # ModelOpt
    ("model.layers.3.self_attn.v_proj.v_scale", KVScaleName("model.layers.3.self_attn", "v")),
    ("model.layers.1.self_attn.k_proj.output_scale", KVScaleName("model.layers.1.self_attn", "k")),  # c-t
    ("model.layers.1.self_attn.kv_scale", KVScaleName("model.layers.1.self_attn", "kv")),  # deprecated
    ("model.layers.1.self_attn.q_scale", KVScaleName("model.layers.1.self_attn", "q")),
    ("model.layers.1.self_attn.k_proj.weight", None),
    ("model.layers.1.self_attn.k_proj.weight_scale", None),
    ("model.layers.1.self_attn.k_proj.input_scale", None),
    ("model.layers.1.mlp.down_proj.weight_scale_inv", None),
])
def test_checkpoint_names(name, expected):
    assert parse_kv_scale_name(name) == expected


def attend(layer: Attention, key: torch.Tensor, value: torch.Tensor, query: torch.Tensor,
           cache_dtype: torch.dtype) -> torch.Tensor:
    """One prefill of a single request through the layer, over a fresh cache of cache_dtype."""
    num_tokens, num_kv_heads, head_dim = key.shape
    kv_cache = torch.zeros(2, 4, 16, num_kv_heads, head_dim, dtype=cache_dtype)
    metadata = AttentionMetadata(slot_mapping=torch.arange(num_tokens), query_start_loc=[0, num_tokens],
                                 seq_lens=[num_tokens], block_tables=torch.arange(4, dtype=torch.int32)[None],
                                 block_size=16)
    positions = torch.arange(num_tokens)
    return layer(positions, query.clone(), key.clone(), value.clone(), kv_cache, metadata)


def test_scales_from_the_first_batch_beat_scale_one_past_the_float8_range(monkeypatch):
    monkeypatch.setenv("SERVAL_ATTENTION_BACKEND", "torch")
    torch.manual_seed(0)
    query, key, value = torch.randn(24, 4, 32), GROWTH * torch.randn(24, 2, 32), GROWTH * torch.randn(24, 2, 32)
    query = query / GROWTH  # scores of a normal size, so the softmax is not one-hot
    reference = attend(Attention(4, 2, 32, 32 ** -0.5), key, value, query, torch.float32)
    unscaled = attend(Attention(4, 2, 32, 32 ** -0.5), key, value, query, torch.float8_e4m3fn)
    layer = Attention(4, 2, 32, 32 ** -0.5)
    layer.has_kv_scales = layer.calculate_kv_scales = True
    scaled = attend(layer, key, value, query, torch.float8_e4m3fn)
    assert not layer.calculate_kv_scales  # once, from this batch
    assert layer.k_scale.item() == pytest.approx(key.abs().max().item() / 200)
    assert layer.v_scale.item() == pytest.approx(value.abs().max().item() / 100)
    scaled_error = (scaled - reference).abs().mean() / reference.abs().mean()
    unscaled_error = (unscaled - reference).abs().mean() / reference.abs().mean()
    assert scaled_error < 0.05 < 0.3 < unscaled_error, (scaled_error, unscaled_error)


def test_calculate_kv_scales_keeps_zero_batches_finite():
    k_scale, v_scale = torch.ones(()), torch.ones(())
    calculate_kv_scales(torch.zeros(3, 2, 4), torch.zeros(3, 2, 4), k_scale, v_scale)
    assert 0 < k_scale.item() < 1e-6 and 0 < v_scale.item() < 1e-6


def grown_checkpoint(path) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The tiny Llama with q_proj / GROWTH, k_proj and v_proj * GROWTH and o_proj / GROWTH: the same function,
    keys and values GROWTH times larger. Returns the transformers model and per-layer scales under the two
    naming schemes (vLLM / llm-compressor on layer 0, ModelOpt on layer 1)."""
    hf_model = build_tiny_model(path, "llama", seed=5)
    with torch.no_grad():
        for layer in hf_model.model.layers:
            attention = layer.self_attn
            attention.q_proj.weight /= GROWTH
            attention.k_proj.weight *= GROWTH
            attention.v_proj.weight *= GROWTH
            attention.o_proj.weight /= GROWTH
    hf_model.save_pretrained(path)
    # A calibration-style scale: |k| and |v| stay below about 3 * GROWTH here, so 448 is not reached.
    names = ("model.layers.0.self_attn.k_scale", "model.layers.0.self_attn.v_scale",
             "model.layers.1.self_attn.k_proj.k_scale", "model.layers.1.self_attn.v_proj.v_scale")
    scales = {name: torch.tensor(3 * GROWTH / 300) for name in names}
    return hf_model, scales


def logprob_errors(llm: LLM, hf_model, prompts: list[list[int]]) -> float:
    """Mean |logprob of each greedy token - transformers' on the same sequence|."""
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=1, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    errors = []
    for prompt, output in zip(prompts, outputs):
        completion = output.outputs[0]
        with torch.no_grad():
            reference = torch.log_softmax(hf_model(torch.tensor([prompt + completion.token_ids])).logits[0], dim=-1)
        for step, token in enumerate(completion.token_ids):
            row = reference[len(prompt) - 1 + step]
            errors.append(abs(completion.logprobs[step][token].logprob - row[token].item()))
    return sum(errors) / len(errors)


def test_a_checkpoint_with_kv_scales_decodes_closer_to_transformers(tmp_path):
    unscaled_dir, scaled_dir = tmp_path / "unscaled", tmp_path / "scaled"
    hf_model, scales = grown_checkpoint(unscaled_dir)
    grown_checkpoint(scaled_dir)
    tensors = load_file(os.path.join(scaled_dir, "model.safetensors"))
    save_file({**tensors, **scales}, os.path.join(scaled_dir, "model.safetensors"), metadata={"format": "pt"})
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 320, (length,), generator=generator).tolist() for length in (5, 17, 30)]
    engine_args = dict(skip_tokenizer_init=True, block_size=4, max_model_len=96, kv_cache_memory_bytes=256 * 1024,
                       kv_cache_dtype="fp8")
    with_scales = LLM(model=str(scaled_dir), **engine_args)
    attention = with_scales.engine.model.model.layers[1].self_attn.attn
    assert attention.has_kv_scales and attention.k_scale.item() == pytest.approx(scale_value(scales))
    errors = {"checkpoint scales": logprob_errors(with_scales, hf_model, prompts),
              "scale 1.0": logprob_errors(LLM(model=str(unscaled_dir), **engine_args), hf_model, prompts),
              "first-batch scales": logprob_errors(LLM(model=str(unscaled_dir), calculate_kv_scales=True,
                                                       **engine_args), hf_model, prompts)}
    # Scale 1.0 saturates every key and value at 448; the scaled caches keep them, at float8's precision.
    assert errors["checkpoint scales"] < 0.1 and errors["first-batch scales"] < 0.1, errors
    assert errors["scale 1.0"] > 4 * max(errors["checkpoint scales"], errors["first-batch scales"]), errors


def scale_value(scales: dict[str, torch.Tensor]) -> float:
    return next(iter(scales.values())).item()


def test_a_scale_per_head_or_for_a_missing_layer_is_refused_by_name(tiny_models):
    path, _ = tiny_models("llama")
    llm = LLM(model=path, skip_tokenizer_init=True, max_model_len=64, kv_cache_memory_bytes=64 * 1024)
    model = llm.engine.model
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_scale.*shape \(2,\).*per-head"):
        list(take_kv_scales(model, [("model.layers.0.self_attn.k_scale", torch.ones(2))]))
    with pytest.raises(ValueError, match=r"model.layers.7.self_attn.v_scale.*no attention layer"):
        list(take_kv_scales(model, [("model.layers.7.self_attn.v_scale", torch.ones(()))]))
    with pytest.raises(ValueError, match=r"must be a positive finite number"):
        list(take_kv_scales(model, [("model.layers.0.self_attn.v_scale", torch.zeros(()))]))
    kept = list(take_kv_scales(model, [("model.layers.0.self_attn.kv_scale", torch.tensor(2.0)),
                                       ("model.norm.weight", torch.ones(64))]))
    attention = model.model.layers[0].self_attn.attn
    assert [name for name, _ in kept] == ["model.norm.weight"]
    assert attention.k_scale.item() == attention.v_scale.item() == 2.0 and attention.has_kv_scales
