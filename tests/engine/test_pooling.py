"""The pooling runner end to end in the engine: LLM(..., runner="pooling").embed / .encode on tiny random-weight
checkpoints equal what transformers computes from the same weights (pooled hidden states, score-head logits), with
prompts of mixed lengths batched together, prefilled in chunks, preempted and hitting the prefix cache."""
from __future__ import annotations

import json
import os

import pytest
import torch
import transformers

from serval import LLM
from serval.openai.errors import InvalidArgument
from serval.pooling_params import PoolingParams
from serval.sampling_params import SamplingParams
from tests.conftest import TINY

LENGTHS = (5, 40, 17, 3, 33, 64)
QWEN3 = dict(TINY, head_dim=32)


def _prompts(seed: int = 0, lengths=LENGTHS) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, TINY["vocab_size"], (length,), generator=generator).tolist() for length in lengths]


def _save(path, model) -> str:
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def qwen3_embedder(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.Qwen3Model(transformers.Qwen3Config(**QWEN3)).eval()
    return _save(tmp_path_factory.mktemp("qwen3_embed"), model), model


def write_sentence_transformers(path: str, pooling_flag: str, normalize: bool) -> None:
    """modules.json and 1_Pooling/config.json as sentence-transformers saves them."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    with open(os.path.join(path, "modules.json"), "w") as f:
        json.dump(modules, f)
    os.makedirs(os.path.join(path, "1_Pooling"), exist_ok=True)
    flags = {flag: flag == pooling_flag for flag in (
        "pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
        "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")}
    with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": TINY["hidden_size"], **flags, "include_prompt": True}, f)


def _hidden(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).last_hidden_state[0]


def _embedder(path: str, **engine_args) -> LLM:
    # A step of 16 tokens, no per-request cap: prompts longer than 16 are prefilled in chunks, and short ones share
    # steps with the chunks of long ones.
    args = dict(load_format="safetensors", skip_tokenizer_init=True, max_model_len=64, max_num_batched_tokens=16,
                long_prefill_token_threshold=0)
    return LLM(path, **{**args, **engine_args})


def test_last_token_embeddings_equal_transformers_batched_and_chunked(qwen3_embedder):
    path, model = qwen3_embedder
    llm = _embedder(path)  # runner auto: a Qwen3Model checkpoint pools
    assert llm.engine.config.runner == "pooling"
    prompts = _prompts()
    outputs = llm.embed(prompts, use_tqdm=False)
    assert [output.prompt_token_ids for output in outputs] == prompts
    for prompt, output in zip(prompts, outputs):
        expected = torch.nn.functional.normalize(_hidden(model, prompt)[-1], dim=-1)
        torch.testing.assert_close(torch.tensor(output.outputs.embedding), expected, atol=1e-4, rtol=0)
    assert llm.engine.kv_cache.num_free_blocks == llm.engine.kv_cache.num_blocks  # nothing held after pooling


def test_matryoshka_dimensions_and_normalize_off(qwen3_embedder):
    path, model = qwen3_embedder
    llm = _embedder(path)
    prompts = _prompts(1, (9, 30))
    truncated = llm.embed(prompts, PoolingParams(dimensions=8), use_tqdm=False)
    raw = llm.embed(prompts, PoolingParams(normalize=False), use_tqdm=False)
    for prompt, short, plain in zip(prompts, truncated, raw):
        last = _hidden(model, prompt)[-1]
        torch.testing.assert_close(torch.tensor(short.outputs.embedding),
                                   torch.nn.functional.normalize(last[:8], dim=-1), atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(plain.outputs.embedding), last, atol=1e-4, rtol=0)
    with pytest.raises(InvalidArgument) as caught:
        llm.embed(prompts, PoolingParams(dimensions=TINY["hidden_size"] + 1), use_tqdm=False)
    assert caught.value.param == "dimensions"


@pytest.mark.parametrize("flag, normalize", [("pooling_mode_mean_tokens", False), ("pooling_mode_mean_tokens", True),
                                             ("pooling_mode_cls_token", True), ("pooling_mode_lasttoken", False)])
def test_sentence_transformers_pooling_config(tmp_path, flag, normalize):
    torch.manual_seed(2)
    model = transformers.LlamaModel(transformers.LlamaConfig(**TINY)).eval()
    path = _save(tmp_path, model)
    write_sentence_transformers(path, flag, normalize)
    llm = _embedder(path, runner="pooling")
    prompts = _prompts(2)
    reduce = {"pooling_mode_mean_tokens": lambda h: h.mean(dim=0), "pooling_mode_cls_token": lambda h: h[0],
              "pooling_mode_lasttoken": lambda h: h[-1]}[flag]
    for prompt, output in zip(prompts, llm.embed(prompts, use_tqdm=False)):
        expected = reduce(_hidden(model, prompt))
        if normalize:
            expected = torch.nn.functional.normalize(expected, dim=-1)
        torch.testing.assert_close(torch.tensor(output.outputs.embedding), expected, atol=1e-4, rtol=0)
    # Mean and CLS need hidden states a prefix hit would skip: the prefix cache is off for them.
    assert llm.engine.config.enable_prefix_caching == (flag == "pooling_mode_lasttoken")


def test_pooler_config_overrides_the_checkpoint(qwen3_embedder):
    """vLLM's --pooler-config: mean pooling, unnormalised, for a checkpoint that would pool its last token."""
    path, model = qwen3_embedder
    llm = _embedder(path, pooler_config='{"pooling_type": "mean", "normalize": false}')
    assert not llm.engine.config.enable_prefix_caching
    prompts = _prompts(7, (20, 6))
    for prompt, output in zip(prompts, llm.embed(prompts, use_tqdm=False)):
        torch.testing.assert_close(torch.tensor(output.outputs.embedding), _hidden(model, prompt).mean(dim=0),
                                   atol=1e-4, rtol=0)
    with pytest.raises(InvalidArgument) as caught:
        _embedder(path, pooler_config={"pooling_type": "MAX"})
    assert caught.value.param == "pooler_config"


def test_mean_pooling_survives_preemption(tmp_path):
    """Six blocks of 16 tokens for four 60-token prompts prefilled 8 tokens at a time: requests are preempted
    mid-prompt and recomputed, and their means count every position once."""
    torch.manual_seed(3)
    model = transformers.LlamaModel(transformers.LlamaConfig(**TINY)).eval()
    path = _save(tmp_path, model)
    write_sentence_transformers(path, "pooling_mode_mean_tokens", False)
    llm = _embedder(path, max_num_batched_tokens=32, long_prefill_token_threshold=8, num_gpu_blocks_override=6)
    prompts = _prompts(3, (60, 60, 60, 60))
    outputs = llm.embed(prompts, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, output in zip(prompts, outputs):
        torch.testing.assert_close(torch.tensor(output.outputs.embedding), _hidden(model, prompt).mean(dim=0),
                                   atol=1e-4, rtol=0)


def test_last_token_pooling_hits_the_prefix_cache(qwen3_embedder):
    path, model = qwen3_embedder
    llm = _embedder(path)
    prefix = _prompts(4, (48,))[0]
    prompts = [prefix + [7, 8], prefix + [9]]
    first = llm.embed(prompts[:1], use_tqdm=False)[0]
    hits_before = llm.engine.kv_cache.prefix_cache_hits
    second = llm.embed(prompts[1:], use_tqdm=False)[0]
    assert llm.engine.kv_cache.prefix_cache_hits - hits_before == 48
    for prompt, output in zip(prompts, (first, second)):
        expected = torch.nn.functional.normalize(_hidden(model, prompt)[-1], dim=-1)
        torch.testing.assert_close(torch.tensor(output.outputs.embedding), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family, num_labels", [("qwen3", 1), ("llama", 3)])
def test_sequence_classification_scores_equal_transformers_logits(tmp_path, family, num_labels):
    config_cls, model_cls, extra = {
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForSequenceClassification, dict(head_dim=32)),
        "llama": (transformers.LlamaConfig, transformers.LlamaForSequenceClassification, {})}[family]
    torch.manual_seed(4)
    model = model_cls(config_cls(**TINY, **extra, num_labels=num_labels)).eval()
    path = _save(tmp_path, model)
    llm = _embedder(path)
    assert llm.engine.pooling_task == "classify"
    prompts = _prompts(5)
    raw = llm.encode(prompts, PoolingParams(activation=False), use_tqdm=False)
    activated = llm.encode(prompts, use_tqdm=False)
    for prompt, plain, output in zip(prompts, raw, activated):
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(plain.outputs.data, logits, atol=1e-4, rtol=0)
        expected = logits.sigmoid() if num_labels == 1 else logits.softmax(dim=-1)
        torch.testing.assert_close(output.outputs.data, expected, atol=1e-5, rtol=0)


def test_a_causal_lm_served_with_runner_pooling_embeds_its_decoder_states(tiny_models):
    path, model = tiny_models("qwen3")
    llm = _embedder(path, runner="pooling")
    prompts = _prompts(6, (12, 20))
    for prompt, output in zip(prompts, llm.embed(prompts, use_tqdm=False)):
        with torch.no_grad():
            last = model.model(torch.tensor([prompt])).last_hidden_state[0, -1]
        torch.testing.assert_close(torch.tensor(output.outputs.embedding),
                                   torch.nn.functional.normalize(last, dim=-1), atol=1e-4, rtol=0)


def test_wrong_runner_both_ways_names_the_runner(qwen3_embedder, tiny_models):
    embedder = _embedder(qwen3_embedder[0])
    with pytest.raises(InvalidArgument, match="pooling runner") as caught:
        embedder.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert caught.value.param == "model"
    assert not embedder.engine.has_unfinished_requests()
    generator = LLM(tiny_models("qwen3")[0], load_format="safetensors", skip_tokenizer_init=True, max_model_len=64)
    assert generator.engine.config.runner == "generate"
    with pytest.raises(InvalidArgument, match="generate runner"):
        generator.embed([[5, 6, 7]], use_tqdm=False)
    with pytest.raises(ValueError, match="runner='pooling'"):
        LLM(qwen3_embedder[0], runner="generate", load_format="safetensors", skip_tokenizer_init=True)


@pytest.mark.parametrize("prompt, message", [([], "empty"), (list(range(65)), "max_model_len"),
                                             ([TINY["vocab_size"]], "token ids")])
def test_bad_prompts_are_refused_and_nothing_runs(qwen3_embedder, prompt, message):
    llm = _embedder(qwen3_embedder[0])
    with pytest.raises(InvalidArgument, match=message):
        llm.embed([[5, 6], prompt], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert len(llm.embed([list(range(3, 67))], use_tqdm=False)[0].outputs.embedding) == TINY["hidden_size"]
