"""Request bodies → SamplingParams, and the validation that turns bad input into 400s."""
import pytest
from pydantic import ValidationError

from serval.openai.protocol import (ChatCompletionRequest, CompletionRequest, TokenizeRequest, UsageInfo)


def test_completion_defaults_are_openais():
    request = CompletionRequest(prompt="hi")
    params = request.to_sampling_params()
    assert params.max_tokens == 16 and params.temperature == 1.0 and params.top_p == 1.0 and params.n == 1
    assert params.logprobs is None and params.prompt_logprobs is None


def test_completion_maps_every_sampling_field():
    request = CompletionRequest(prompt="hi", max_tokens=5, temperature=0.5, top_p=0.9, top_k=40, min_p=0.05,
                                n=3, stop="END", seed=11, presence_penalty=0.1, frequency_penalty=0.2,
                                repetition_penalty=1.1, logprobs=2, echo=True, logit_bias={"7": -3.0},
                                ignore_eos=True, min_tokens=2, stop_token_ids=[5], user="u")
    params = request.to_sampling_params()
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.min_p) == (5, 0.5, 0.9, 40,
                                                                                                  0.05)
    assert (params.n, params.stop, params.seed, params.stop_token_ids) == (3, ["END"], 11, [5])
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.1, 0.2, 1.1)
    assert params.logprobs == 2 and params.prompt_logprobs == 2  # echo scores the prompt too
    assert params.logit_bias == {7: -3.0} and params.ignore_eos and params.min_tokens == 2


@pytest.mark.parametrize("prompt, expected", [
    ("text", ["text"]), (["a", "b"], ["a", "b"]), ([1, 2, 3], [[1, 2, 3]]), ([[1], [2, 3]], [[1], [2, 3]])])
def test_completion_prompt_forms(prompt, expected):
    assert CompletionRequest(prompt=prompt).prompts() == expected


@pytest.mark.parametrize("body, param", [
    ({"prompt": []}, "prompt"), ({}, "prompt"), ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"), ({"prompt": "x", "logit_bias": {"1": 101}}, "logit_bias"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, None), ({"prompt": {"a": 1}}, "prompt")])
def test_completion_rejects(body, param):
    with pytest.raises(ValidationError) as error:
        CompletionRequest.model_validate(body)
    if param is not None:
        assert error.value.errors()[0]["loc"][0] == param


def test_out_of_range_values_fail_in_sampling_params_naming_the_argument():
    with pytest.raises(ValueError, match="temperature"):
        CompletionRequest(prompt="x", temperature=-1).to_sampling_params()
    with pytest.raises(ValueError, match="top_p"):
        ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], top_p=0).to_sampling_params()


def test_chat_max_completion_tokens_wins_and_default_is_context():
    messages = [{"role": "user", "content": "x"}]
    assert ChatCompletionRequest(messages=messages).to_sampling_params().max_tokens is None
    assert ChatCompletionRequest(messages=messages, max_tokens=9).to_sampling_params().max_tokens == 9
    request = ChatCompletionRequest(messages=messages, max_tokens=9, max_completion_tokens=4)
    assert request.to_sampling_params().max_tokens == 4


def test_chat_logprobs():
    messages = [{"role": "user", "content": "x"}]
    assert ChatCompletionRequest(messages=messages).to_sampling_params().logprobs is None
    assert ChatCompletionRequest(messages=messages, logprobs=True).to_sampling_params().logprobs == 0
    assert ChatCompletionRequest(messages=messages, logprobs=True, top_logprobs=5).to_sampling_params().logprobs == 5
    with pytest.raises(ValidationError, match="top_logprobs needs logprobs"):
        ChatCompletionRequest(messages=messages, top_logprobs=5)
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=messages, logprobs=True, top_logprobs=21)


def test_chat_messages_render_for_templates():
    request = ChatCompletionRequest(messages=[
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None},
        {"role": "tool", "content": "42", "tool_call_id": "c1"}])
    assert request.template_messages() == [
        {"role": "system", "content": "rules"}, {"role": "user", "content": "ab"},
        {"role": "assistant", "content": ""}, {"role": "tool", "content": "42", "tool_call_id": "c1"}]


@pytest.mark.parametrize("messages", [
    [], [{"role": "wizard", "content": "x"}], [{"role": "user", "content": [{"type": "image_url"}]}],
    [{"content": "x"}]])
def test_chat_rejects_bad_messages(messages):
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=messages)


def test_tokenize_needs_exactly_one_input():
    with pytest.raises(ValidationError):
        TokenizeRequest()
    with pytest.raises(ValidationError):
        TokenizeRequest(prompt="x", messages=[{"role": "user", "content": "x"}])


def test_usage_totals():
    usage = UsageInfo.of(3, 4, cached_tokens=2)
    assert (usage.total_tokens, usage.prompt_tokens_details) == (7, {"cached_tokens": 2})
