"""serval.model.gguf: dequantizers against gguf's numpy reference, and GGUF round trips of tiny HF models."""
from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
import transformers

from serval.layers.rotary import inverse_frequencies, rope_parameters
from serval.model.gguf import _llama3_rope_scaling, dequantize, find_gguf_file, load_gguf
from serval.model.llama import head_dim_of

Q = gguf.GGMLQuantizationType
QUANTIZABLE = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0]  # gguf.quants can quantize these
K_QUANTS = [Q.Q4_K, Q.Q5_K, Q.Q6_K]  # dequantize only: fed random bytes with sane fp16 scales
# Byte offsets of each block's fp16 scales: random bytes there would give inf/nan.
FP16_FIELDS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_dequantize_matches_gguf_reference_on_quantized_data(qtype):
    rng = np.random.default_rng(0)
    values = rng.normal(0, 0.5, size=(48, 256)).astype(np.float32)
    raw = gguf.quants.quantize(values, qtype)
    expected = gguf.quants.dequantize(raw, qtype)
    actual = dequantize(raw, qtype, (48, 256))
    assert actual.dtype == torch.float32 and actual.shape == (48, 256)
    torch.testing.assert_close(actual, torch.from_numpy(expected), rtol=1e-6, atol=1e-7)
    assert (actual - torch.from_numpy(values)).abs().max() < 0.5  # and it is near the original


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda t: t.name)
def test_k_quant_dequantize_matches_gguf_reference_on_random_blocks(qtype):
    rng = np.random.default_rng(1)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, blocks_per_row = 6, 3
    raw = rng.integers(0, 256, size=(rows * blocks_per_row, type_size), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        scales = rng.uniform(-0.05, 0.05, size=rows * blocks_per_row).astype(np.float16)
        raw[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    raw = raw.reshape(rows, blocks_per_row * type_size)
    expected = gguf.quants.dequantize(raw, qtype)
    actual = dequantize(raw, qtype, (rows, blocks_per_row * block_size))
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, torch.from_numpy(expected), rtol=1e-6, atol=1e-7)


def test_dequantize_f32_is_exact_and_unsupported_types_say_so():
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert torch.equal(dequantize(values, Q.F32, (3, 4)), torch.from_numpy(values))
    with pytest.raises(ValueError, match="Q8_K.*supported: F32, F16"):
        dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[Q.Q8_K][1]), np.uint8), Q.Q8_K, (1, 256))


# --- round trips: HF model -> GGUF (as llama.cpp's convert_hf_to_gguf.py writes it) -> load_gguf ----------------------

GGUF_TENSORS = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf_name: str) -> str:
    module, _, suffix = hf_name.rpartition(".")
    if module in GGUF_TENSORS:
        return f"{GGUF_TENSORS[module]}.{suffix}"
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{GGUF_TENSORS[rest]}.{suffix}"


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def llama3_rope_factors(config) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors: llama3 rope scaling as a per-frequency tensor."""
    rope = config.rope_parameters
    dim = config.head_dim
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context_len = rope["original_max_position_embeddings"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context_len / high:
            factors.append(1)
        elif wavelen > old_context_len / low:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def add_model_metadata(writer: gguf.GGUFWriter, config) -> None:
    """The keys every architecture's converter writes for the decoder's shape (not the feed-forward width, which
    mixtures of experts write per expert)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def write_gguf(path, arch: str, model, matrix_type=Q.F32, add_metadata=None) -> None:
    """Write `model` as llama.cpp's converter would; add_metadata(writer) adds more keys (e.g. a tokenizer)."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    add_model_metadata(writer, config)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    if config.rope_parameters.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(config))
    if add_metadata is not None:
        add_metadata(writer)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name, tensor in state.items():
        data = tensor.numpy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            data = llama_cpp_permute(data, config.num_attention_heads, config.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            data = llama_cpp_permute(data, config.num_attention_heads, config.num_key_value_heads)
        if data.ndim == 2 and matrix_type == Q.F16:
            writer.add_tensor(gguf_name(name), data.astype(np.float16))
        elif data.ndim == 2 and matrix_type != Q.F32:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(data, matrix_type), raw_dtype=matrix_type)
        else:
            writer.add_tensor(gguf_name(name), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.Q8_0: 1e-2}  # tiny models' weights are below 0.5 in magnitude


@pytest.mark.parametrize("arch,gguf_arch", [("llama", "llama"), ("llama3.1", "llama"), ("qwen2", "qwen2"),
                                            ("qwen3", "qwen3")])
@pytest.mark.parametrize("matrix_type", [Q.F32, Q.F16, Q.Q8_0], ids=lambda t: t.name)
def test_round_trip_matches_hf_state_dict(tmp_path, tiny_models, arch, gguf_arch, matrix_type):
    _, model = tiny_models(arch)
    write_gguf(tmp_path / "model.gguf", gguf_arch, model, matrix_type)

    checkpoint = load_gguf(str(tmp_path / "model.gguf"))

    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    assert sorted(checkpoint.weights) == sorted(expected)
    for name, tensor in expected.items():
        actual = checkpoint.weights[name]
        assert actual.dtype == torch.float32 and actual.shape == tensor.shape, name
        tolerance = TOLERANCE[matrix_type] if tensor.ndim == 2 else 0.0
        torch.testing.assert_close(actual, tensor, rtol=0, atol=tolerance, msg=name)


@pytest.mark.parametrize("arch,gguf_arch", [("llama", "llama"), ("llama3.1", "llama"), ("qwen2", "qwen2"),
                                            ("qwen3", "qwen3")])
def test_round_trip_config_rebuilds_the_same_model(tmp_path, tiny_models, arch, gguf_arch):
    _, model = tiny_models(arch)
    write_gguf(tmp_path / "model.gguf", gguf_arch, model)

    checkpoint = load_gguf(str(tmp_path))  # a directory holding one GGUF works too
    # Serval's models read the GGUF's own config (no transformers import); every field they read equals
    # transformers', and to_transformers() rebuilds transformers' class, which must run the same model.
    assert checkpoint.config.architectures == [type(model).__name__]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act", "sliding_window", "model_type"):
        assert getattr(checkpoint.config, key) == getattr(model.config, key, None), key
    assert checkpoint.config.head_dim == head_dim_of(model.config)
    # llama 3 rope parameters are refitted from rope_freqs (equal frequencies, not equal numbers).
    torch.testing.assert_close(inverse_frequencies(checkpoint.config.head_dim, rope_parameters(checkpoint.config)),
                               model.model.rotary_emb.inv_freq)
    assert checkpoint.config.attention_bias == getattr(model.config, "attention_bias", arch == "qwen2")
    config = checkpoint.config.to_transformers()
    assert type(config) is type(model.config)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(config, key) == getattr(model.config, key), key
    rebuilt = type(model)(config).eval()
    missing, unexpected = rebuilt.load_state_dict(checkpoint.weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    torch.testing.assert_close(rebuilt.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_llama3_rope_parameters_recovered_from_rope_freqs_of_a_real_size_model():
    """Llama 3.1 8B's rope (head_dim 128): several frequencies are smoothed, so the line fit is exercised."""
    config = transformers.LlamaConfig(
        hidden_size=4096, num_attention_heads=32, rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192})
    rope_scaling = _llama3_rope_scaling(torch.from_numpy(llama3_rope_factors(config)), 500000.0, 128)
    assert rope_scaling["original_max_position_embeddings"] == 8192 and rope_scaling["factor"] == 8.0
    recovered = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
                                         max_position_embeddings=131072, rope_scaling=rope_scaling)
    init = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"]
    torch.testing.assert_close(init(recovered, "cpu")[0], init(config, "cpu")[0], rtol=1e-5, atol=0)


def test_unknown_architecture_names_the_supported_ones(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"'gpt2'.*supported: \[.*'llama', 'qwen2', 'qwen3'"):
        load_gguf(str(tmp_path / "gpt2.gguf"))


def test_load_gguf_without_a_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_gguf(str(tmp_path))


def test_find_gguf_file(tmp_path):
    assert find_gguf_file(str(tmp_path / "missing.gguf")) is None
    assert find_gguf_file(str(tmp_path)) is None  # empty directory

    model = tmp_path / "a.gguf"
    model.write_bytes(b"")
    (tmp_path / "README.md").write_text("")
    assert find_gguf_file(str(model)) == str(model)
    assert find_gguf_file(str(tmp_path)) == str(model)
    assert find_gguf_file(str(tmp_path / "README.md")) is None

    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"several GGUF files \['a.gguf', 'b.gguf'\]"):
        find_gguf_file(str(tmp_path))

    (tmp_path / "model.safetensors").write_bytes(b"")
    assert find_gguf_file(str(tmp_path)) is None  # an HF checkpoint directory, whatever else it holds
