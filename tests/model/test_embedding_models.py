"""Pooling models: which class an architecture and a runner give, how a checkpoint says it pools
(sentence-transformers' modules.json), bare-decoder weight names, and the Qwen3-Reranker yes/no mode against the
causal LM's own logits."""
from __future__ import annotations

import json
import types

import pytest
import torch
import transformers

from serval import LLM
from serval.layers.pooling import PoolerConfig
from serval.model import pooling_model
from serval.model.llama import Qwen3ForCausalLM
from serval.model.loader import load_model
from serval.model.registry import get_model_class, resolve_runner
from serval.pooling_params import PoolingParams
from tests.conftest import TINY
from tests.engine.test_pooling import write_sentence_transformers
from tests.openai.tool_parsers.streaming import qwen3_tokenizer


def _config(architecture: str):
    return types.SimpleNamespace(architectures=[architecture])


@pytest.mark.parametrize("architecture, runner, cls", [
    ("Qwen3Model", "auto", pooling_model.Qwen3ForEmbedding),
    ("LlamaModel", "pooling", pooling_model.LlamaForEmbedding),
    ("Qwen2Model", "auto", pooling_model.Qwen2ForEmbedding),
    ("Qwen3ForSequenceClassification", "auto", pooling_model.Qwen3ForSequenceClassification),
    ("LlamaForSequenceClassification", "auto", pooling_model.LlamaForSequenceClassification),
    ("Qwen3ForCausalLM", "pooling", pooling_model.Qwen3ForEmbedding),
    ("Qwen3ForCausalLM", "auto", Qwen3ForCausalLM),
])
def test_architecture_and_runner_choose_the_class(architecture, runner, cls):
    assert get_model_class(_config(architecture), runner) is cls


def test_runner_auto_pools_only_pooling_architectures():
    assert resolve_runner(_config("Qwen3Model")) == "pooling"
    assert resolve_runner(_config("LlamaForCausalLM")) == "generate"
    with pytest.raises(ValueError, match="runner='pooling'"):
        get_model_class(_config("Qwen3ForSequenceClassification"), "generate")
    with pytest.raises(ValueError, match="cannot run with runner='pooling'"):
        get_model_class(_config("Gemma3ForCausalLM"), "pooling")


def test_pooler_config_from_sentence_transformers_files(tmp_path):
    embedder = pooling_model.LlamaForEmbedding.__new__(pooling_model.LlamaForEmbedding)
    classifier = pooling_model.LlamaForSequenceClassification.__new__(pooling_model.LlamaForSequenceClassification)
    assert pooling_model.load_pooler_config(str(tmp_path), embedder) == PoolerConfig("LAST", True)
    assert pooling_model.load_pooler_config(str(tmp_path), classifier) == PoolerConfig("LAST", False)
    write_sentence_transformers(str(tmp_path), "pooling_mode_mean_tokens", normalize=True)
    assert pooling_model.load_pooler_config(str(tmp_path), embedder) == PoolerConfig("MEAN", True)
    write_sentence_transformers(str(tmp_path), "pooling_mode_cls_token", normalize=False)
    assert pooling_model.load_pooler_config(str(tmp_path), embedder) == PoolerConfig("CLS", False)
    write_sentence_transformers(str(tmp_path), "pooling_mode_max_tokens", normalize=False)
    with pytest.raises(ValueError, match="pooling_mode_max_tokens"):
        pooling_model.load_pooler_config(str(tmp_path), embedder)
    modules = json.loads((tmp_path / "modules.json").read_text())
    (tmp_path / "modules.json").write_text(json.dumps(modules + [{"idx": 3, "name": "3", "path": "3_Dense",
                                                                  "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(ValueError, match="Dense"):
        pooling_model.load_pooler_config(str(tmp_path), embedder)


def test_a_bare_decoder_checkpoint_loads_and_a_wrong_one_is_refused(tmp_path):
    torch.manual_seed(0)
    hf = transformers.Qwen3Model(transformers.Qwen3Config(**TINY, head_dim=32)).eval()
    hf.save_pretrained(tmp_path)
    model, _ = load_model(str(tmp_path))
    assert isinstance(model, pooling_model.Qwen3ForEmbedding) and not hasattr(model, "lm_head")
    torch.testing.assert_close(model.model.embed_tokens.weight, hf.embed_tokens.weight)
    torch.testing.assert_close(model.model.layers[1].self_attn.q_norm.weight, hf.layers[1].self_attn.q_norm.weight)
    with pytest.raises(ValueError, match="missing weights"):  # Qwen2 wants q/k/v biases a Qwen3 checkpoint lacks
        config = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2Model"],
                                                          "model_type": "qwen2"}))
        load_model(str(tmp_path))


@pytest.fixture(scope="module")
def yes_no_reranker(tmp_path_factory):
    """A tiny Qwen3 causal LM with Qwen3's tokenizer, its config.json marked as the reranker mode."""
    path = tmp_path_factory.mktemp("qwen3_reranker")
    tokenizer = qwen3_tokenizer()
    tokenizer.save_pretrained(path)
    config = transformers.Qwen3Config(**{**TINY, "vocab_size": len(tokenizer), "pad_token_id": None,
                                         "bos_token_id": None, "eos_token_id": None}, head_dim=16,
                                      tie_word_embeddings=False)
    torch.manual_seed(5)
    model = transformers.Qwen3ForCausalLM(config).eval()
    model.save_pretrained(path)
    saved = json.loads((path / "config.json").read_text())
    saved.update(architectures=["Qwen3ForSequenceClassification"], classifier_from_token=["no", "yes"])
    (path / "config.json").write_text(json.dumps(saved))
    return str(path), model, tokenizer


def test_yes_no_reranker_scores_are_the_causal_lms_yes_against_no(yes_no_reranker):
    path, model, tokenizer = yes_no_reranker
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    llm = LLM(path, load_format="safetensors", max_model_len=128)
    query, documents = "Is the sky blue?", ["The sky is blue on a clear day.", "Bananas are yellow."]
    scores = llm.score(query, documents, use_tqdm=False)
    raw = llm.score(query, documents, PoolingParams(activation=False), use_tqdm=False)
    for document, output, plain in zip(documents, scores, raw):
        token_ids = tokenizer(text=query, text_pair=document)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([token_ids])).logits[0, -1]
        assert output.prompt_token_ids == token_ids
        assert plain.outputs.score == pytest.approx(float(logits[yes] - logits[no]), abs=1e-4)
        # sigmoid(yes - no) is P(yes) when the model may only say yes or no.
        assert output.outputs.score == pytest.approx(float(logits[[no, yes]].softmax(dim=-1)[1]), abs=1e-5)
