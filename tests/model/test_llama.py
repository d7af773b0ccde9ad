"""The Llama family against transformers on the same tiny random checkpoints: one flat batch, and chunked steps."""
from __future__ import annotations

import pytest
import torch
from tests.conftest import build_tiny_model
from tests.kernels.test_paged_attention import allocate_blocks, step_metadata

from serval.engine.model_runner import kv_cache_shape
from serval.model.llama import LlamaForCausalLM
from serval.model.loader import load_model

ARCHS = ["llama", "llama3.1", "mistral", "qwen2", "qwen3"]
LENGTHS = [5, 17, 30]  # 30 > Mistral's sliding window of 24
BLOCK_SIZE = 4


def hf_logits(hf_model, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [hf_model(seq[None]).logits[0].float() for seq in sequences]


def sequences_for(vocab_size: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=generator) for n in LENGTHS]


def run_steps(model, sequences, steps: list[list[tuple[int, int]]]) -> list[torch.Tensor]:
    """Run the steps (per-request spans [start, end)) through one KV cache (the model's own shape, as the runner
    allocates it: DeepSeek-V3's latent cache too); return each sequence's logits."""
    block_ids, num_blocks = allocate_blocks([len(s) for s in sequences], BLOCK_SIZE, seed=7)
    dtype = next(model.parameters()).dtype
    kv_caches = [torch.zeros(kv_cache_shape(model, num_blocks, BLOCK_SIZE), dtype=dtype)
                 for _ in range(model.num_layers)]
    logits = [[] for _ in sequences]
    with torch.inference_mode():
        for spans in steps:
            active = [i for i, (start, end) in enumerate(spans) if end > start]
            positions, metadata = step_metadata([block_ids[i] for i in active], [spans[i] for i in active],
                                                BLOCK_SIZE)
            input_ids = torch.cat([sequences[i][slice(*spans[i])] for i in active])
            hidden = model(input_ids, positions, kv_caches, metadata)
            assert hidden.shape == (len(input_ids), model.config.hidden_size)
            out = model.compute_logits(hidden)
            assert out.dtype == torch.float32
            for row, i in enumerate(active):
                logits[i].append(out[metadata.query_start_loc[row]:metadata.query_start_loc[row + 1]])
    return [torch.cat(chunks) for chunks in logits]


@pytest.mark.parametrize("arch", ARCHS)
def test_flat_batch_and_chunked_prefill_match_transformers(arch, tiny_models):
    from tests.model.engine_checks import check_logits_match_transformers  # it imports this module's helpers
    path, hf_model = tiny_models(arch)
    check_logits_match_transformers(path, hf_model, LlamaForCausalLM)


def test_sliding_window_changes_the_output(tiny_models):
    # Guards the Mistral case above against passing vacuously: without the window, long-sequence logits differ.
    path, hf_model = tiny_models("mistral")
    model, config = load_model(path, load_format="safetensors")
    sequences = sequences_for(config.vocab_size)
    for layer in model.model.layers:
        assert layer.self_attn.attn.sliding_window == 24
        layer.self_attn.attn.sliding_window = None
    unwindowed = run_steps(model, sequences, [[(0, len(s)) for s in sequences]])
    expected = hf_logits(hf_model, sequences)
    assert not torch.allclose(unwindowed[2][24:], expected[2][24:], atol=1e-4)
    torch.testing.assert_close(unwindowed[2][:24], expected[2][:24], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("overrides", [
    dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
])
def test_llama_variants_match_transformers(overrides, tmp_path):
    hf_model = build_tiny_model(tmp_path, "llama", seed=1, **overrides)
    model, config = load_model(str(tmp_path), load_format="safetensors")
    sequences = sequences_for(config.vocab_size, seed=1)
    got = run_steps(model, sequences, [[(0, 2), (0, 10), (0, 29)], [(2, 5), (10, 17), (29, 30)]])
    for g, want in zip(got, hf_logits(hf_model, sequences)):
        torch.testing.assert_close(g, want, atol=1e-4, rtol=1e-4)


def test_bfloat16_is_close_to_float32_reference(tiny_models):
    path, hf_model = tiny_models("qwen3")
    model, config = load_model(path, load_format="safetensors", dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.attn.rotary_emb.cos_cache.dtype == torch.float32
    sequences = sequences_for(config.vocab_size)
    got = run_steps(model, sequences, [[(0, len(s)) for s in sequences]])
    for g, want in zip(got, hf_logits(hf_model, sequences)):
        assert torch.isfinite(g).all()
        assert (g - want).abs().max() < 0.1 * want.abs().max()


def test_model_exposes_kv_cache_shape(tiny_models):
    model, config = load_model(tiny_models("qwen3")[0], load_format="safetensors")
    assert (model.num_layers, model.num_kv_heads, model.head_dim, model.vocab_size) == (2, 2, 32, 320)


def test_load_weights_names_missing_and_unknown(tiny_models):
    path, hf_model = tiny_models("qwen2")
    model, _ = load_model(path, load_format="dummy")
    weights = dict(hf_model.state_dict())
    weights.pop("model.layers.1.self_attn.k_proj.bias")
    weights["model.layers.0.mlp.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unknown weights \[model.layers.0.mlp.extra.weight\].*"
                                         r"missing weights \[model.layers.1.self_attn.k_proj.bias\]"):
        model.load_weights(weights.items())
    weights = dict(hf_model.state_dict())
    weights["model.norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match="model.norm.weight.*shape"):
        model.load_weights(weights.items())


def test_load_weights_skips_rotary_inv_freq(tiny_models):
    path, hf_model = tiny_models("llama")
    model, _ = load_model(path, load_format="dummy")
    weights = list(hf_model.state_dict().items()) + [("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8))]
    model.load_weights(weights)
    torch.testing.assert_close(model.model.layers[1].self_attn.qkv_proj.weight[-32:],
                               hf_model.model.layers[1].self_attn.v_proj.weight)


@pytest.mark.parametrize("arch, quantization", [("llama", None), ("qwen2", None), ("qwen3", "fp8")])
def test_one_row_steps_leave_each_norm_to_the_gemv_that_reads_it(arch, quantization, tiny_models, monkeypatch):
    # A decode row on the GEMV path (SERVAL_GEMV=triton: Triton's interpreter here) runs the layers as four GEMVs
    # each: o_proj and down_proj add the residual and start the next norm, qkv_proj and gate_up_proj finish it
    # (all norms but the first and the final one). Its logits stay as close to transformers' as those of the norm
    # kernels (SERVAL_FUSED_NORM=0). qwen2: q/k/v biases; qwen3: q/k norms and float8 rows.
    pytest.importorskip("triton")
    from serval.kernels import triton_gemv
    from serval.layers.linear import Linear
    # One program a projection's 64 rows (a GPU's 2 to 16 would be 10-30 interpreted programs a GEMV).
    monkeypatch.setattr(triton_gemv, "DEFAULT_CONFIG", (64, 128, 4))
    monkeypatch.setattr(triton_gemv, "FP8_CONFIG", (64, 128, 4))
    path, hf_model = tiny_models(arch)
    model, config = load_model(path, load_format="safetensors", dtype=torch.float16, quantization=quantization)
    sequence = sequences_for(config.vocab_size)[1]
    prompt = 13
    steps = [[(0, prompt)]] + [[(i, i + 1)] for i in range(prompt, len(sequence))]
    monkeypatch.setenv("SERVAL_GEMV", "triton")
    monkeypatch.setenv("SERVAL_FUSED_NORM", "1")  # the default takes it for float8 weights only
    finished = []
    forward_normed = Linear.forward_normed
    monkeypatch.setattr(Linear, "forward_normed", lambda self, normed: finished.append(self) or forward_normed(
        self, normed))
    fused = run_steps(model, [sequence], steps)[0]
    assert len(finished) == (2 * config.num_hidden_layers - 1) * (len(sequence) - prompt)  # not the prompt's
    monkeypatch.setenv("SERVAL_FUSED_NORM", "0")
    unfused = run_steps(model, [sequence], steps)[0]
    assert len(finished) == (2 * config.num_hidden_layers - 1) * (len(sequence) - prompt)
    want = hf_logits(hf_model, [sequence])[0]
    decode = slice(prompt, None)
    # The norm kernels round RMSNorm(h) to float16 where the GEMVs round g h only: some 2e-3 of these logits apart
    # (a 2% error in either GEMV's 1/rms moves them by 5e-2).
    torch.testing.assert_close(fused[decode], unfused[decode], atol=1e-2, rtol=0)
    fused_error = (fused[decode] - want[decode]).abs().max()
    unfused_error = (unfused[decode] - want[decode]).abs().max()
    assert fused_error <= 1.5 * unfused_error + 1e-3, (fused_error, unfused_error)
    torch.testing.assert_close(fused[:prompt], unfused[:prompt], atol=0, rtol=0)
    assert torch.equal(fused[decode].argmax(-1), unfused[decode].argmax(-1))
