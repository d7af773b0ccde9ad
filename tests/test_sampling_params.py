"""SamplingParams: every invalid argument raises InvalidArgument naming the OpenAI (or vLLM) body field, the value
given and what is allowed; valid edge values pass and the engine can use them."""
import math
import re

import pytest
import torch

from serval.openai.errors import InvalidArgument
from serval.sampling_params import MAX_N, SEED_RANGE, SamplingParams, StructuredOutputsParams, plain_token_ids

INF, NAN = math.inf, math.nan

# (arguments, the param at fault, the value the message must name, words of the allowed range it must give)
INVALID = [
    (dict(n=0), "n", "0", f"[1, {MAX_N}]"),
    (dict(n=-3), "n", "-3", f"[1, {MAX_N}]"),
    (dict(n=MAX_N + 1), "n", str(MAX_N + 1), f"[1, {MAX_N}]"),
    (dict(n=10**9), "n", str(10**9), f"[1, {MAX_N}]"),
    (dict(n=True), "n", "True", f"[1, {MAX_N}]"),
    (dict(n=2.0), "n", "2.0", f"[1, {MAX_N}]"),
    (dict(seed=SEED_RANGE[1] + 1), "seed", str(2**63), f"[{-2**63}, {2**63 - 1}]"),
    (dict(seed=SEED_RANGE[0] - 1), "seed", str(-2**63 - 1), f"[{-2**63}, {2**63 - 1}]"),
    (dict(seed=2**200), "seed", str(2**200), f"[{-2**63}, {2**63 - 1}]"),
    (dict(seed=True), "seed", "True", "an integer"),
    (dict(seed="7"), "seed", "'7'", "an integer"),
    (dict(max_tokens=True), "max_tokens", "True", "an integer >= 1"),
    (dict(max_tokens=0), "max_tokens", "0", "an integer >= 1"),
    (dict(max_tokens=2.5), "max_tokens", "2.5", "an integer >= 1"),
    (dict(min_tokens=False), "min_tokens", "False", "an integer >= 0"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens", "5", "<= max_tokens (2)"),
    (dict(logprobs=True), "logprobs", "True", "an integer >= 0"),
    (dict(prompt_logprobs=-1), "prompt_logprobs", "-1", "an integer >= 0"),
    (dict(top_k=True), "top_k", "True", "-1, 0 (all tokens) or a positive integer"),
    (dict(top_k=-2), "top_k", "-2", "-1, 0 (all tokens) or a positive integer"),
    (dict(stop_token_ids=[5, -1]), "stop_token_ids", "[-1]", "non-negative integer token ids"),
    (dict(stop_token_ids=[True]), "stop_token_ids", "[True]", "non-negative integer token ids"),
    (dict(stop_token_ids=[1.0]), "stop_token_ids", "[1.0]", "non-negative integer token ids"),
    (dict(stop_token_ids=["3"]), "stop_token_ids", "['3']", "non-negative integer token ids"),
    (dict(stop_token_ids=3), "stop_token_ids", "3", "a list of non-negative integer token ids"),
    (dict(logit_bias={-1: 1.0}), "logit_bias", "{-1: 1.0}", "non-negative integer token ids as keys"),
    (dict(logit_bias={"-1": 1.0}), "logit_bias", "{'-1': 1.0}", "non-negative integer token ids as keys"),
    (dict(logit_bias={"abc": 1.0}), "logit_bias", "{'abc': 1.0}", "non-negative integer token ids as keys"),
    (dict(logit_bias={True: 1.0}), "logit_bias", "{True: 1.0}", "non-negative integer token ids as keys"),
    (dict(logit_bias={1.5: 1.0}), "logit_bias", "{1.5: 1.0}", "non-negative integer token ids as keys"),
    (dict(logit_bias={3: NAN}), "logit_bias", "{3: nan}", "finite numbers as biases"),
    (dict(logit_bias={3: INF}), "logit_bias", "{3: inf}", "finite numbers as biases"),
    (dict(logit_bias={3: "1"}), "logit_bias", "{3: '1'}", "finite numbers as biases"),
    (dict(logit_bias=[1, 2]), "logit_bias", "[1, 2]", "a mapping of token ids to biases"),
    (dict(temperature=-0.1), "temperature", "-0.1", "a finite number >= 0"),
    (dict(temperature=INF), "temperature", "inf", "a finite number >= 0"),
    (dict(temperature=NAN), "temperature", "nan", "a finite number >= 0"),
    (dict(temperature=True), "temperature", "True", "a finite number >= 0"),
    (dict(temperature="0.5"), "temperature", "'0.5'", "a finite number >= 0"),
    (dict(top_p=0.0), "top_p", "0.0", "(0, 1]"),
    (dict(top_p=NAN), "top_p", "nan", "(0, 1]"),
    (dict(min_p=1.5), "min_p", "1.5", "[0, 1]"),
    (dict(presence_penalty=3.0), "presence_penalty", "3.0", "[-2, 2]"),
    (dict(frequency_penalty=-INF), "frequency_penalty", "-inf", "[-2, 2]"),
    (dict(repetition_penalty=0.0), "repetition_penalty", "0.0", "(0, 2]"),
    (dict(stop=5), "stop", "5", "a string, a list of strings or None"),
    (dict(stop=["ok", ""]), "stop", "['ok', '']", "non-empty strings"),
    (dict(stop=[3]), "stop", "[3]", "non-empty strings"),
    (dict(ignore_eos="yes"), "ignore_eos", "'yes'", "true or false"),
    (dict(skip_special_tokens=1), "skip_special_tokens", "1", "true or false"),
    (dict(structured_outputs={"regex": "a+"}), "structured_outputs", "{'regex': 'a+'}", "a StructuredOutputsParams"),
    (dict(allowed_token_ids=[]), "allowed_token_ids", "[]", "a non-empty list of non-negative integer token ids"),
    (dict(allowed_token_ids=()), "allowed_token_ids", "()", "a non-empty list of non-negative integer token ids"),
    (dict(allowed_token_ids=[3, -1]), "allowed_token_ids", "[-1]", "non-negative integer token ids"),
    (dict(allowed_token_ids=[False]), "allowed_token_ids", "[False]", "non-negative integer token ids"),
    (dict(allowed_token_ids=[2.0]), "allowed_token_ids", "[2.0]", "non-negative integer token ids"),
    (dict(allowed_token_ids=7), "allowed_token_ids", "7", "a list of non-negative integer token ids"),
    (dict(bad_words="word"), "bad_words", "'word'", "a list of strings"),
    (dict(bad_words=5), "bad_words", "5", "a list of strings"),
    (dict(bad_words=["ok", ""]), "bad_words", "['']", "strings with at least one non-whitespace character"),
    (dict(bad_words=[" \n\t"]), "bad_words", "[' \\n\\t']", "strings with at least one non-whitespace character"),
    (dict(bad_words=["ok", 3, None]), "bad_words", "[3, None]", "strings with at least one non-whitespace"),
    (dict(bad_words_token_ids=[[1], []]), "bad_words_token_ids", "[]", "non-empty lists of non-negative integer"),
    (dict(bad_words_token_ids=[[1, -2]]), "bad_words_token_ids", "[-2]", "non-negative integer token ids"),
    (dict(bad_words_token_ids=[3]), "bad_words_token_ids", "3", "a list of non-negative integer token ids"),
    (dict(bad_words_token_ids="ab"), "bad_words_token_ids", "'ab'", "a list of lists of non-negative integer"),
]


@pytest.mark.parametrize("kwargs, param, given, allowed", INVALID, ids=[str(case[0]) for case in INVALID])
def test_invalid_argument_names_param_value_and_range(kwargs, param, given, allowed):
    with pytest.raises(InvalidArgument) as caught:
        SamplingParams(**kwargs)
    error = caught.value
    assert isinstance(error, ValueError)  # callers that catch ValueError keep working
    assert error.param == param
    message = str(error)
    assert message.startswith(f"invalid sampling parameter {param}=")
    assert f"{param}={given}:" in message
    assert re.search(r"allowed .*" + re.escape(allowed), message), message


def test_structured_outputs_errors_carry_their_field():
    with pytest.raises(InvalidArgument) as caught:
        StructuredOutputsParams(choice="yes")
    assert caught.value.param == "structured_outputs.choice"
    with pytest.raises(InvalidArgument) as caught:
        StructuredOutputsParams(regex="a", grammar="b")
    assert caught.value.param == "structured_outputs"


@pytest.mark.parametrize("kwargs", [
    dict(n=1), dict(n=MAX_N), dict(seed=SEED_RANGE[0]), dict(seed=SEED_RANGE[1]), dict(seed=0), dict(max_tokens=None),
    dict(stop_token_ids=[0, 2]), dict(stop_token_ids=(4, 5)), dict(logit_bias={0: -100, 7: 100.0}),
    dict(temperature=0), dict(top_k=-1), dict(stop="x"), dict(logprobs=0),
    dict(allowed_token_ids=[0]), dict(allowed_token_ids=(4, 5)), dict(bad_words=[]), dict(bad_words=[" x", "a b"]),
    dict(bad_words_token_ids=[[0], [3, 4, 5]]),
])
def test_edge_values_are_accepted(kwargs):
    SamplingParams(**kwargs)


def test_logit_bias_keys_as_json_sends_them_become_token_ids():
    params = SamplingParams(logit_bias={"42": 5, 7: -1.5})
    assert params.logit_bias == {42: 5.0, 7: -1.5}
    assert all(type(key) is int and type(value) is float for key, value in params.logit_bias.items())


def test_every_accepted_seed_seeds_every_choice():
    # The engine seeds choice i with seed + i (engine._new_request): torch must take it for all accepted values.
    generator = torch.Generator()
    for seed in (SEED_RANGE[0], SEED_RANGE[1] + MAX_N - 1):
        generator.manual_seed(seed)
    with pytest.raises((RuntimeError, ValueError)):
        generator.manual_seed(SEED_RANGE[1] + 1 + 2**63)


def test_clone_revalidates():
    params = SamplingParams(max_tokens=4)
    with pytest.raises(InvalidArgument) as caught:
        params.clone(max_tokens=True)
    assert caught.value.param == "max_tokens"


def test_the_engine_samples_with_the_extreme_seeds(tiny_models):
    from serval import LLM
    llm = LLM(model=tiny_models("llama")[0], skip_tokenizer_init=True, max_model_len=64)
    for seed in SEED_RANGE:
        params = SamplingParams(n=3, seed=seed, temperature=1.0, max_tokens=4, ignore_eos=True)
        first, again = (llm.generate({"prompt_token_ids": [5, 6, 7]}, params, use_tqdm=False)[0] for _ in range(2))
        assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]
        assert all(len(c.token_ids) == 4 for c in first.outputs)


def test_token_constraints_are_lists_of_ints_and_clone_keeps_them():
    params = SamplingParams(allowed_token_ids=(4, 5), bad_words=("spam",), bad_words_token_ids=((7,), (8, 9)))
    assert params.allowed_token_ids == [4, 5] and params.bad_words == ["spam"]
    assert params.bad_words_token_ids == [[7], [8, 9]]
    copy = params.clone(temperature=0.0)
    assert (copy.allowed_token_ids, copy.bad_words, copy.bad_words_token_ids) == ([4, 5], ["spam"], [[7], [8, 9]])
    assert SamplingParams().allowed_token_ids is None and SamplingParams().bad_words_token_ids is None


def test_numpy_integers_are_integers_and_numpy_bools_are_not():
    import numpy as np
    params = SamplingParams(stop_token_ids=[np.int64(3)], logit_bias={np.int32(4): np.float32(1.5)}, seed=np.int64(2),
                            allowed_token_ids=np.array([6, 7]))
    assert params.stop_token_ids == [3] and type(params.stop_token_ids[0]) is int
    assert params.allowed_token_ids == [6, 7] and type(params.allowed_token_ids[0]) is int
    assert params.logit_bias == {4: 1.5} and type(next(iter(params.logit_bias))) is int
    with pytest.raises(InvalidArgument) as caught:
        SamplingParams(max_tokens=np.bool_(True))
    assert caught.value.param == "max_tokens"


def test_plain_token_ids_take_the_quick_check_only_when_it_can_decide():
    # Lists of Python ints in range pass without a per-id look (a server builds them on its event loop); anything
    # else is left to the per-id check, which names the bad ids or, for numpy integers, accepts them.
    import numpy as np
    assert plain_token_ids([0, 5, 9], vocab_size=10) and plain_token_ids([]) and plain_token_ids([7])
    assert not plain_token_ids([0, 10], vocab_size=10) and not plain_token_ids([-1, 3])
    assert not plain_token_ids([True, 2]) and not plain_token_ids([1.0]) and not plain_token_ids([np.int64(3)])
    assert SamplingParams(allowed_token_ids=[np.int64(3), 4]).allowed_token_ids == [3, 4]
