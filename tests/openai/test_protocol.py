"""Request bodies → SamplingParams, and the validation that turns bad input into 400s."""
import pytest
from pydantic import ValidationError

from serval.openai.errors import APIError, InvalidArgument
from serval.openai.protocol import (MAX_BAD_WORD_CHARS, MAX_BAD_WORDS, ChatCompletionRequest, CompletionRequest,
                                    DetokenizeRequest, TokenizeRequest, UsageInfo)


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


# ---------------------------------------------------------------- strict types (issue 13, defect 12)
def _sdk_field_types(params_module) -> dict[str, type]:
    """The openai SDK's request fields that are a plain int, float or bool (Optional or not): the reference for
    which of our fields must refuse which JSON types."""
    import typing
    hints = typing.get_type_hints(params_module.CompletionCreateParamsBase)
    plain = {}
    for name, hint in hints.items():
        members = [arg for arg in typing.get_args(hint) if arg is not type(None)] or [hint]
        if len(members) == 1 and members[0] in (int, float, bool):
            plain[name] = members[0]
    return plain


# A wrong value per SDK type: JSON values that pydantic's lax mode would coerce and OpenAI refuses.
WRONG = {int: [True, "3", 2.5, [3]], float: ["0.5", True, [0.5], {"v": 1}], bool: ["yes", 1, "true", 0]}
RIGHT = {int: 3, float: 1, bool: True}  # an int where a float goes is fine: JSON has one number type


def _sdk_cases():
    from openai.types import completion_create_params as completions
    from openai.types.chat import completion_create_params as chat
    cases = []
    for model, module, base in ((CompletionRequest, completions, {"prompt": "x"}),
                                (ChatCompletionRequest, chat, {"messages": [{"role": "user", "content": "x"}]})):
        for name, kind in _sdk_field_types(module).items():
            if name in model.model_fields:
                cases.append((model, base, name, kind))
    return cases


@pytest.mark.parametrize("model, base, name, kind", _sdk_cases(),
                         ids=lambda v: v.__name__ if isinstance(v, type) else str(v)[:12])
def test_fields_refuse_what_openai_refuses(model, base, name, kind):
    extra = {"logprobs": True} if name == "top_logprobs" else {}
    for wrong in WRONG[kind]:
        with pytest.raises(ValidationError) as error:
            model.model_validate({**base, **extra, name: wrong})
        assert error.value.errors()[0]["loc"][0] == name, (name, wrong)
    right = RIGHT[kind] if name != "logprobs" or kind is bool else 2
    model.model_validate({**base, **extra, name: right})


def test_the_sdk_reference_covers_the_fields_that_matter():
    names = {name for _, _, name, _ in _sdk_cases()}
    assert {"max_tokens", "max_completion_tokens", "n", "seed", "temperature", "top_p", "echo", "logprobs",
            "top_logprobs", "presence_penalty", "frequency_penalty"} <= names


@pytest.mark.parametrize("name, wrong", [("stream", "yes"), ("stream", 1), ("ignore_eos", "true"), ("top_k", True),
                                         ("min_tokens", True), ("min_p", "0.1"), ("repetition_penalty", True),
                                         ("skip_special_tokens", 0), ("include_stop_str_in_output", "no"),
                                         ("spaces_between_special_tokens", "false"), ("stop", 5), ("stop", ["a", 5]),
                                         ("model", 5), ("user", 1)])
def test_vllm_extras_and_the_stream_switch_are_strict_too(name, wrong):
    for model, base in ((CompletionRequest, {"prompt": "x"}),
                        (ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}]})):
        with pytest.raises(ValidationError) as error:
            model.model_validate({**base, name: wrong})
        assert error.value.errors()[0]["loc"][0] == name


def test_spaces_between_special_tokens_reaches_the_sampling_params():
    for model, base in ((CompletionRequest, {"prompt": "x"}),
                        (ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}]})):
        assert model.model_validate(base).to_sampling_params().spaces_between_special_tokens is True
        request = model.model_validate({**base, "spaces_between_special_tokens": False})
        assert request.to_sampling_params().spaces_between_special_tokens is False


BOTH = ((CompletionRequest, {"prompt": "x"}), (ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}]}))


def test_allowed_token_ids_and_bad_words_reach_the_sampling_params():
    for model, base in BOTH:
        params = model.model_validate(base).to_sampling_params()
        assert params.allowed_token_ids is None and params.bad_words is None
        params = model.model_validate({**base, "allowed_token_ids": [3, 0, 9], "bad_words": ["spam", " eggs"]}
                                      ).to_sampling_params()
        assert params.allowed_token_ids == [3, 0, 9] and params.bad_words == ["spam", " eggs"]
        assert params.bad_words_token_ids is None  # the engine tokenizes them, with the model's tokenizer


@pytest.mark.parametrize("wrong", ["spam", ["spam", 5], [["spam"]], [None], {"spam": 1}, [True],
                                   ["x"] * (MAX_BAD_WORDS + 1), ["x" * (MAX_BAD_WORD_CHARS + 1)]],
                         ids=["string", "number", "nested", "null", "object", "bool", "too-many", "too-long"])
def test_bad_words_are_a_bounded_list_of_strings(wrong):
    for model, base in BOTH:
        with pytest.raises(ValidationError) as error:
            model.model_validate({**base, "bad_words": wrong})
        assert APIError.from_validation_error(error.value).param.split(".")[0] == "bad_words"
    for model, base in BOTH:  # the bounds themselves are served
        model.model_validate({**base, "bad_words": ["x" * MAX_BAD_WORD_CHARS] * MAX_BAD_WORDS})


def test_a_blank_bad_word_names_the_field():
    for model, base in BOTH:
        with pytest.raises(InvalidArgument) as error:
            model.model_validate({**base, "bad_words": ["ok", " \t"]}).to_sampling_params()
        assert error.value.param == "bad_words"


def test_nested_bools_are_strict():
    for body in ({"prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}},
                 {"prompt": "x", "response_format": {"type": "json_schema",
                                                     "json_schema": {"schema": {}, "strict": "yes"}}}):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate(body)
    with pytest.raises(ValidationError):
        TokenizeRequest.model_validate({"prompt": "x", "add_special_tokens": "no"})


def test_what_real_clients_send_still_parses():
    # Integers for floats, nulls for optional fields (LiteLLM and LangChain send both), floats for logit biases.
    request = ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}], "temperature": 0, "top_p": 1,
        "presence_penalty": 0, "frequency_penalty": 0, "n": None, "stream": None, "logprobs": None,
        "max_tokens": None, "stop": None, "seed": None, "logit_bias": {"12": -100, "13": 2.5}, "user": None,
        "stream_options": None, "response_format": None, "parallel_tool_calls": True, "store": False})
    assert request.n == 1 and request.stream is False and request.logprobs is False
    params = request.to_sampling_params()
    assert params.temperature == 0 and params.logit_bias == {12: -100.0, 13: 2.5}
    completion = CompletionRequest.model_validate({"prompt": "x", "echo": None, "max_tokens": None, "n": 2})
    assert completion.echo is False and completion.max_tokens is None and completion.n == 2


def test_null_for_a_required_field_is_still_an_error():
    with pytest.raises(ValidationError) as error:
        CompletionRequest.model_validate({"prompt": None})
    assert error.value.errors()[0]["loc"][0] == "prompt"


@pytest.mark.parametrize("value", [True, 0, -1, 1.5, "2"])
def test_max_completion_tokens_errors_name_max_completion_tokens(value):
    with pytest.raises(ValidationError) as error:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                              "max_completion_tokens": value})
    assert APIError.from_validation_error(error.value).param == "max_completion_tokens"


def test_the_limit_param_is_the_field_sent():
    messages = [{"role": "user", "content": "x"}]
    assert ChatCompletionRequest(messages=messages, max_completion_tokens=3).max_tokens_param == "max_completion_tokens"
    assert ChatCompletionRequest(messages=messages, max_tokens=3).max_tokens_param == "max_tokens"
    assert ChatCompletionRequest(messages=messages).max_tokens_param == "max_tokens"


@pytest.mark.parametrize("seed", [2**63, -2**63 - 1, 10**30])
def test_seed_out_of_int64_is_400_naming_seed(seed):
    with pytest.raises(ValidationError) as error:
        CompletionRequest.model_validate({"prompt": "x", "seed": seed})
    assert APIError.from_validation_error(error.value).param == "seed"
    CompletionRequest.model_validate({"prompt": "x", "seed": 2**63 - 1})
    CompletionRequest.model_validate({"prompt": "x", "seed": -2**63})


def test_n_must_be_at_least_one_and_is_not_bounded_here():
    for n in (0, -1):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"prompt": "x", "n": n})
    assert CompletionRequest.model_validate({"prompt": "x", "n": 50_000}).n == 50_000


# ---------------------------------------------------------------- token ids (issue 13, defects 1 and 5)
@pytest.mark.parametrize("prompt", [[1, -2], [-1], [[3], [4, -5]], [1, True], [[1], [True]], [1, 2.0], [[1], []],
                                    [1, "a"], ["a", 1], [[1], 2], [None]])
def test_prompt_token_ids_must_be_non_negative_integers(prompt):
    with pytest.raises(ValidationError) as error:
        CompletionRequest.model_validate({"prompt": prompt})
    assert APIError.from_validation_error(error.value).param == "prompt"


@pytest.mark.parametrize("field, value", [("stop_token_ids", [-1]), ("stop_token_ids", [True]),
                                          ("stop_token_ids", ["5"]), ("logit_bias", {"-1": 1}),
                                          ("logit_bias", {"1.5": 1}), ("logit_bias", {"٣": 1}),
                                          ("logit_bias", {"5": "1"}), ("allowed_token_ids", [-3]),
                                          ("allowed_token_ids", []), ("allowed_token_ids", [False])])
def test_other_token_ids_must_be_non_negative_integers(field, value):
    for model, base in ((CompletionRequest, {"prompt": "x"}),
                        (ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}]})):
        with pytest.raises(ValidationError) as error:
            model.model_validate({**base, field: value})
        assert APIError.from_validation_error(error.value).param.split(".")[0] == field


def test_detokenize_tokens_must_be_non_negative_integers():
    for tokens in ([-1], [True], [1.0], ["1"]):
        with pytest.raises(ValidationError) as error:
            DetokenizeRequest.model_validate({"tokens": tokens})
        assert APIError.from_validation_error(error.value).param.split(".")[0] == "tokens"
    assert DetokenizeRequest.model_validate({"tokens": [0, 5]}).tokens == [0, 5]


def test_large_token_ids_parse_here_and_are_the_engines_to_bound():
    request = CompletionRequest.model_validate({"prompt": [10**9], "stop_token_ids": [10**9],
                                                "logit_bias": {str(10**9): 1}})
    assert request.prompts() == [[10**9]] and request.stop_token_ids == [10**9]


@pytest.mark.parametrize("body", [
    {"model": "\ud800", "prompt": "x"}, {"prompt": "a\udfffb"}, {"prompt": ["ok", "\ud800"]},
    {"prompt": "x", "stop": ["\udc00"]}, {"prompt": "x", "user": "\ud800"}])
def test_lone_surrogates_anywhere_are_refused(body):
    with pytest.raises(ValidationError) as error:
        CompletionRequest.model_validate(body)
    assert "surrogate" in APIError.from_validation_error(error.value).message


def test_lone_surrogates_in_chat_and_tokenize_are_refused():
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": [{"type": "text",
                                                                                        "text": "\ud800"}]}]})
    with pytest.raises(ValidationError):
        TokenizeRequest.model_validate({"messages": [{"role": "user", "content": "\udfff"}]})


def test_union_members_do_not_leak_into_param():
    with pytest.raises(ValidationError) as error:
        CompletionRequest.model_validate({"prompt": "x", "stop": 5})
    api_error = APIError.from_validation_error(error.value)
    assert api_error.param == "stop" and "str" not in api_error.param
    with pytest.raises(ValidationError) as error:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": 5}]})
    assert APIError.from_validation_error(error.value).param == "messages.0.content"


def test_request_schemas_say_the_strict_types():
    """/openapi.json is built from these: schema-driven clients and fuzzers see what the server accepts."""
    completion = CompletionRequest.model_json_schema()["properties"]
    # 0 is allowed: with echo and logprobs it scores the prompt alone (SamplingParams refuses it otherwise).
    assert {"minimum": 0, "type": "integer"} in completion["max_tokens"]["anyOf"]
    assert completion["stream"]["type"] == "boolean"
    assert {"type": "number"} in completion["temperature"]["anyOf"]
    token_ids = {"items": {"minimum": 0, "type": "integer"}, "type": "array"}
    assert token_ids in completion["prompt"]["anyOf"]
    chat = ChatCompletionRequest.model_json_schema()["properties"]
    assert {"minimum": 1, "type": "integer"} in chat["max_completion_tokens"]["anyOf"]
    assert DetokenizeRequest.model_json_schema()["properties"]["tokens"] == {**token_ids, "title": "Tokens"}
