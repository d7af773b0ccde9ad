"""Mixture-of-experts GGUF files: a tiny random Qwen3-MoE (and Mixtral, which llama.cpp writes as a `llama` with
`llama.expert_count`) written as llama.cpp's converter writes it, with each layer's experts stacked in
ffn_gate_exps / ffn_up_exps / ffn_down_exps, loaded by Serval and compared with transformers on the same weights:
transformers' own model (from which the file was written) and, for Qwen3-MoE, transformers loading the GGUF itself."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers

from serval.model.gguf import load_gguf
from serval.model.loader import load_model
from serval.model.mixtral import MixtralForCausalLM
from serval.model.qwen_moe import Qwen3MoeForCausalLM
from tests.model.engine_checks import check_greedy_matches_transformers
from tests.model.tiny_models import build_tiny as build_tiny_moe
from tests.model.test_gguf import add_model_metadata, llama_cpp_permute
from tests.model.test_llama import hf_logits, run_steps, sequences_for

Q = gguf.GGMLQuantizationType
# HF module -> llama.cpp tensor (gguf.constants.TENSOR_NAMES) for what these two families hold besides the experts.
GGUF_TENSORS = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate": "ffn_gate_inp",
}


def gguf_tensors(model, arch: str) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp's names: experts stacked per projection [E, out, in], q/k rows permuted
    for `llama` (convert_hf_to_gguf.py's LlamaModel)."""
    config = model.config
    tensors = {}
    for name, tensor in model.state_dict().items():
        data = tensor.numpy()
        module, _, suffix = name.rpartition(".")
        if module.endswith("mlp.experts"):
            layer = name.split(".")[2]
            if suffix == "down_proj":
                tensors[f"blk.{layer}.ffn_down_exps.weight"] = data
            else:  # gate_up_proj [E, 2I, H]: gate rows, then up rows
                gate, up = np.split(data, 2, axis=1)
                tensors[f"blk.{layer}.ffn_gate_exps.weight"] = np.ascontiguousarray(gate)
                tensors[f"blk.{layer}.ffn_up_exps.weight"] = np.ascontiguousarray(up)
            continue
        if arch == "llama" and name.endswith("q_proj.weight"):
            data = llama_cpp_permute(data, config.num_attention_heads, config.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            data = llama_cpp_permute(data, config.num_attention_heads, config.num_key_value_heads)
        if module in GGUF_TENSORS:
            tensors[f"{GGUF_TENSORS[module]}.{suffix}"] = data
        else:
            _, _, layer, rest = module.split(".", 3)
            tensors[f"blk.{layer}.{GGUF_TENSORS[rest]}.{suffix}"] = data
    return tensors


def write_moe_gguf(path, arch: str, model, expert_type=Q.F32) -> dict[str, np.ndarray]:
    """Write `model` as llama.cpp's converter would (`qwen3moe`, or `llama` for Mixtral), the stacked experts in
    expert_type; returns what was written (quantized tensors as their raw blocks)."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    add_model_metadata(writer, config)
    writer.add_expert_used_count(config.num_experts_per_tok)
    if arch == "qwen3moe":
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        writer.add_expert_count(config.num_experts)
    else:
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_expert_count(config.num_local_experts)
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    written = {}
    for name, data in gguf_tensors(model, arch).items():
        if "_exps." in name and expert_type != Q.F32:
            data = gguf.quants.quantize(data, expert_type)
            writer.add_tensor(name, data, raw_dtype=expert_type)
        else:
            writer.add_tensor(name, data)
        written[name] = data
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


@pytest.fixture(scope="module")
def qwen3_moe_gguf(tmp_path_factory):
    """A tiny Qwen3-MoE with experts in every layer (llama.cpp's qwen3moe has no dense layers) as GGUF."""
    path = tmp_path_factory.mktemp("qwen3_moe_gguf")
    hf_model = build_tiny_moe(path / "hf", "qwen3_moe", seed=3, decoder_sparse_step=1)
    write_moe_gguf(path / "model.gguf", "qwen3moe", hf_model)
    return str(path / "model.gguf"), hf_model


@pytest.fixture(scope="module")
def mixtral_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral_gguf")
    hf_model = build_tiny_moe(path / "hf", "mixtral", seed=4)
    write_moe_gguf(path / "model.gguf", "llama", hf_model)
    return str(path / "model.gguf"), hf_model


def check_logits(gguf_path: str, hf_model, model_class) -> None:
    model, config = load_model(gguf_path)
    assert isinstance(model, model_class)
    sequences = sequences_for(config.vocab_size)
    for got, want in zip(run_steps(model, sequences, [[(0, len(s)) for s in sequences]]),
                         hf_logits(hf_model, sequences)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_qwen3_moe_gguf_logits_match_transformers(qwen3_moe_gguf):
    check_logits(*qwen3_moe_gguf, Qwen3MoeForCausalLM)


def test_qwen3_moe_gguf_config(qwen3_moe_gguf):
    path, hf_model = qwen3_moe_gguf
    config = load_gguf(path).config
    assert config.architectures == ["Qwen3MoeForCausalLM"]
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "hidden_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "norm_topk_prob",
                "decoder_sparse_step", "tie_word_embeddings", "vocab_size"):
        assert getattr(config, key) == getattr(hf_model.config, key), key


def test_qwen3_moe_gguf_equals_transformers_loading_the_same_file(qwen3_moe_gguf):
    """transformers reads qwen3moe GGUF files itself: the outside reader agrees with ours on the file (so the file
    is laid out as llama.cpp's, not just as our loader expects) and on the model's logits. transformers' reader
    does not map qwen3moe.expert_feed_forward_length (it keeps Qwen3-30B-A3B's 768, the default), so the test
    passes the experts' width as a config override."""
    path, hf_model = qwen3_moe_gguf
    directory, name = path.rsplit("/", 1)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, moe_intermediate_size=hf_model.config.moe_intermediate_size).eval()
    assert isinstance(theirs, transformers.Qwen3MoeForCausalLM)
    check_logits(path, theirs, Qwen3MoeForCausalLM)


def test_qwen3_moe_gguf_engine_greedy_matches_transformers(qwen3_moe_gguf):
    check_greedy_matches_transformers(*qwen3_moe_gguf, prefix_caching=True)


@pytest.mark.parametrize("expert_type", [Q.F16, Q.Q8_0, Q.Q4_0], ids=lambda t: t.name)
def test_quantized_experts_dequantize_as_gguf_does(tmp_path, expert_type):
    """Each expert's slice of a quantized stack equals gguf's own dequantization of the whole stack."""
    hf_model = build_tiny_moe(tmp_path / "hf", "qwen3_moe", seed=5, decoder_sparse_step=1)
    written = write_moe_gguf(tmp_path / "model.gguf", "qwen3moe", hf_model, expert_type)
    weights = load_gguf(str(tmp_path / "model.gguf")).weights
    num_experts = hf_model.config.num_experts
    for layer in range(hf_model.config.num_hidden_layers):
        for projection in ("gate", "up", "down"):
            raw = written[f"blk.{layer}.ffn_{projection}_exps.weight"]
            expected = torch.from_numpy(gguf.quants.dequantize(raw, expert_type).astype(np.float32))
            got = torch.stack([weights[f"model.layers.{layer}.mlp.experts.{e}.{projection}_proj.weight"]
                               for e in range(num_experts)])
            torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_mixtral_gguf_logits_match_transformers(mixtral_gguf):
    """llama.cpp writes Mixtral as `llama` (q/k rows permuted) with llama.expert_count: a Mixtral, not a Llama."""
    check_logits(*mixtral_gguf, MixtralForCausalLM)
    config = load_gguf(mixtral_gguf[0]).config
    assert (config.num_local_experts, config.num_experts_per_tok) == (4, 2)


def test_mixture_of_experts_gguf_without_expert_count_is_refused(tmp_path):
    hf_model = build_tiny_moe(tmp_path / "hf", "qwen3_moe", seed=6, decoder_sparse_step=1)
    write_moe_gguf(tmp_path / "model.gguf", "qwen3moe", hf_model)
    # Rewrite without the expert count: the same tensors, a file that cannot say how many experts it has.
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    writer = gguf.GGUFWriter(str(tmp_path / "broken.gguf"), "qwen3moe")
    writer.add_block_count(hf_model.config.num_hidden_layers)
    writer.add_embedding_length(hf_model.config.hidden_size)
    writer.add_head_count(hf_model.config.num_attention_heads)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="qwen3moe.expert_count"):
        load_gguf(str(tmp_path / "broken.gguf"))
