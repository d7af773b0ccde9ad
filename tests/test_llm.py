"""The Python API (LLM, SamplingParams) end to end: sampling semantics, stops, bad input, the default model."""
import pytest
import torch

from serval import LLM, SamplingParams
from tests.model.test_gguf_packed import NEAR_TIE_NATS


@pytest.fixture(scope="module")
def tiny_llm(tiny_models):
    path, _ = tiny_models("llama")
    return LLM(model=path, skip_tokenizer_init=True, max_num_seqs=8, max_num_batched_tokens=64, block_size=4,
               max_model_len=128, num_gpu_blocks_override=200)


def ids(*prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def assert_idle(llm):
    stats = llm.engine.get_stats()
    assert not llm.engine.has_unfinished_requests()
    assert stats.num_free_blocks == stats.num_blocks


# ---- sampling ----
def test_seeded_sampling_is_the_same_whatever_the_batch(tiny_llm):
    target = {"prompt_token_ids": [5, 6, 7, 8, 9]}
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = tiny_llm.generate(target, seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = ids([11, 12], [40] * 30, [3, 4, 5, 6])
    other_params = [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True),
                    SamplingParams(temperature=0.7, seed=9, max_tokens=5, ignore_eos=True),
                    SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)]
    mixed = tiny_llm.generate(others[:2] + [target] + others[2:], other_params[:2] + [seeded] + other_params[2:],
                              use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone
    different = tiny_llm.generate(target, seeded.clone(seed=4321), use_tqdm=False)[0].outputs[0].token_ids
    assert different != alone
    assert_idle(tiny_llm)


def test_n_samples_are_distinct_and_reproducible(tiny_llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    first = tiny_llm.generate(ids([20, 21, 22]), params, use_tqdm=False)[0]
    again = tiny_llm.generate(ids([20, 21, 22]), params, use_tqdm=False)[0]
    assert [o.index for o in first.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in first.outputs}) == 3
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]


def test_greedy_n_is_identical_samples(tiny_llm):
    out = tiny_llm.generate(ids([30, 31]), SamplingParams(n=2, temperature=0.0, max_tokens=6, ignore_eos=True),
                            use_tqdm=False)[0]
    assert out.outputs[0].token_ids == out.outputs[1].token_ids


def test_stop_token_ids_end_the_output_and_are_kept(tiny_llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    full = tiny_llm.generate(ids([50, 51, 52]), greedy, use_tqdm=False)[0].outputs[0].token_ids
    stop_at = full[3]
    first_index = full.index(stop_at)
    out = tiny_llm.generate(ids([50, 51, 52]), greedy.clone(stop_token_ids=[stop_at]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == full[:first_index + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at


def test_min_tokens_holds_off_stop_tokens(tiny_llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    full = tiny_llm.generate(ids([60, 61]), greedy, use_tqdm=False)[0].outputs[0].token_ids
    out = tiny_llm.generate(ids([60, 61]), greedy.clone(stop_token_ids=[full[0]], min_tokens=3),
                            use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 4 and full[0] not in out.token_ids[:3]


def test_max_tokens_none_runs_to_the_context_limit(tiny_llm):
    out = tiny_llm.generate(ids([1] * 100), SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 28 and out.finish_reason == "length"


def test_priority_argument_is_accepted(tiny_llm):
    outs = tiny_llm.generate(ids([1, 2], [3, 4]), SamplingParams(max_tokens=2), use_tqdm=False, priority=[1, 0])
    assert [o.prompt_token_ids for o in outs] == [[1, 2], [3, 4]]


# ---- bad input ----
@pytest.mark.parametrize("prompt, message", [
    ({"prompt_token_ids": []}, "empty"),
    ({"prompt_token_ids": [1] * 128}, "max_model_len is 128"),
    ({"prompt_token_ids": [1, 320]}, "[0, 320)"),
    ({"prompt_token_ids": [-1]}, "[0, 320)"),
    ("text without a tokenizer", "token ids"),
    ({"text": "x"}, "prompt_token_ids"),
])
def test_bad_prompts_raise_and_leave_the_engine_clean(tiny_llm, prompt, message):
    good = {"prompt_token_ids": [5, 6]}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        tiny_llm.generate([good, prompt], SamplingParams(max_tokens=2), use_tqdm=False)
    assert_idle(tiny_llm)
    assert tiny_llm.generate(good, SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.parametrize("kwargs, name", [
    (dict(max_tokens=-1), "max_tokens"), (dict(max_tokens=0), "max_tokens"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(temperature=-0.1), "temperature"), (dict(n=0), "n"),
    (dict(top_k=-2), "top_k"), (dict(min_p=1.5), "min_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=3.0), "presence_penalty"), (dict(logprobs=-1), "logprobs"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"), (dict(stop=[""]), "stop"),
])
def test_invalid_sampling_params_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"{name}="):
        SamplingParams(**kwargs)


def test_logit_bias_out_of_vocab_is_rejected(tiny_llm):
    with pytest.raises(ValueError, match="logit_bias"):
        tiny_llm.generate(ids([1, 2]), SamplingParams(logit_bias={10_000: 1.0}), use_tqdm=False)


def test_unknown_engine_argument_is_named(tiny_models):
    with pytest.raises(ValueError, match="max_num_seq"):
        LLM(model=tiny_models("llama")[0], max_num_seq=3)


def test_pool_smaller_than_one_sequence_is_refused(tiny_models):
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(model=tiny_models("llama")[0], skip_tokenizer_init=True, max_model_len=128, block_size=4,
            num_gpu_blocks_override=10)


# ---- the default model: text, stop strings, chat against transformers ----
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
             "Explain what a GPU is in one sentence."]


def test_default_model_chat_matches_transformers(default_llm, hf_default_model):
    hf_model, hf_tokenizer = hf_default_model
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    outputs = default_llm.chat(conversations, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    for conversation, output in zip(conversations, outputs):
        prompt = hf_tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=True)["input_ids"]
        assert output.prompt_token_ids == prompt[0].tolist()
        with torch.no_grad():
            expected = hf_model.generate(prompt, max_new_tokens=24, do_sample=False)[0, prompt.shape[1]:].tolist()
        got = output.outputs[0].token_ids
        assert len(got) == 24 or got[-1] == hf_tokenizer.eos_token_id
        parted = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
        if parted is not None:
            # The packed CPU kernel multiplies in bfloat16, with sums that differ by instruction set (AVX-512 or
            # AVX2): the answers may part only where transformers' own choice was a near tie.
            with torch.no_grad():
                logits = hf_model(torch.cat([prompt[0], torch.tensor(expected[:parted])])[None]).logits[0, -1]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            gap = (logprobs[expected[parted]] - logprobs[got[parted]]).item()
            assert gap < NEAR_TIE_NATS, f"position {parted}: transformers preferred {expected[parted]} by {gap:.3f}"
        assert got[:parted] == expected[:len(got)][:parted]
        assert output.outputs[0].text == hf_tokenizer.decode(got, skip_special_tokens=True)


def test_stop_strings_are_found_across_tokens_and_hidden(default_llm):
    prompt = "The quick brown fox jumps over the lazy dog. The quick brown fox"
    greedy = SamplingParams(temperature=0.0, max_tokens=40)
    full = default_llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0]
    tokenizer = default_llm.get_tokenizer()
    # A stop string made of the end of one token and the start of the next.
    pieces = [tokenizer.decode(full.token_ids[:i]) for i in range(len(full.token_ids) + 1)]
    boundary = next(i for i in range(2, len(pieces) - 1) if len(pieces[i]) - len(pieces[i - 1]) >= 2
                    and len(pieces[i + 1]) - len(pieces[i]) >= 2)
    stop = pieces[boundary][-2:] + pieces[boundary + 1][len(pieces[boundary]):][:2]
    cut = full.text.index(stop)
    hidden = default_llm.generate(prompt, greedy.clone(stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert hidden.text == full.text[:cut] and hidden.finish_reason == "stop" and hidden.stop_reason == stop
    shown = default_llm.generate(prompt, greedy.clone(stop=stop, include_stop_str_in_output=True),
                                 use_tqdm=False)[0].outputs[0]
    assert shown.text == full.text[:cut + len(stop)]


def test_text_prompts_tokenize_like_the_tokenizer(default_llm):
    out = default_llm.generate(["Hello", "Bonjour"], SamplingParams(max_tokens=3), use_tqdm=False)
    tokenizer = default_llm.get_tokenizer()
    assert [o.prompt_token_ids for o in out] == [tokenizer.encode("Hello"), tokenizer.encode("Bonjour")]
    assert all(o.prompt == p for o, p in zip(out, ["Hello", "Bonjour"]))
