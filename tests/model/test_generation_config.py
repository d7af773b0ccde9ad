"""--generation-config: which defaults each value gives, read from transformers' own generation_config.json, and
how the server fills them into a request's SamplingParams (explicit values win)."""
import json

import pytest
import transformers

from serval.model.default_model import default_model_path
from serval.model.generation_config import DEFAULT_MODEL_CARD, GenerationDefaults, load_generation_defaults
from serval.openai.errors import InvalidArgument
from serval.openai.protocol import ChatCompletionRequest, CompletionRequest
from serval.sampling_params import SamplingParams
from serval.server.request_defaults import with_defaults


@pytest.fixture
def model_dir(tmp_path):
    """A folder with the generation_config.json transformers writes for these settings."""
    transformers.GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.1,
                                  max_new_tokens=33).save_pretrained(tmp_path)
    return tmp_path


def test_auto_reads_the_models_generation_config(model_dir):
    defaults = load_generation_defaults("auto", str(model_dir))
    assert defaults.values() == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1,
                                 "max_tokens": 33}
    assert defaults.source.endswith("generation_config.json")


def test_auto_next_to_a_gguf_file_and_without_a_file(model_dir, tmp_path_factory):
    (model_dir / "model.gguf").write_bytes(b"")
    assert load_generation_defaults("auto", str(model_dir / "model.gguf")).temperature == 0.7
    assert load_generation_defaults("auto", "gemma3-270m").values() == {}  # an alias, not a folder
    assert load_generation_defaults("auto", str(tmp_path_factory.mktemp("bare"))).values() == {}


def test_the_default_model_gets_its_cards_values():
    assert DEFAULT_MODEL_CARD == {"temperature": 0.2, "top_p": 0.9}
    for model in (None, default_model_path()):
        assert load_generation_defaults("auto", model).values() == DEFAULT_MODEL_CARD


def test_vllm_ignores_the_file_and_a_path_names_a_folder(model_dir, tmp_path_factory):
    assert load_generation_defaults("vllm", str(model_dir)).values() == {}
    assert load_generation_defaults(str(model_dir), None).top_p == 0.8
    with pytest.raises(InvalidArgument) as error:
        load_generation_defaults(str(tmp_path_factory.mktemp("empty")), None)
    assert error.value.param == "generation_config"


def test_values_sampling_params_refuses_fail_at_load(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": -1}))
    with pytest.raises(InvalidArgument, match="temperature"):
        load_generation_defaults("auto", str(tmp_path))


DEFAULTS = GenerationDefaults(temperature=0.7, top_p=0.8, max_tokens=33, source="test")


def _params(body):
    return with_defaults(body.to_sampling_params(), body, DEFAULTS)


def test_a_request_without_the_fields_gets_the_defaults():
    chat = _params(ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}]))
    assert (chat.temperature, chat.top_p, chat.max_tokens) == (0.7, 0.8, 33)
    completion = _params(CompletionRequest(prompt="hi"))
    assert (completion.temperature, completion.top_p, completion.max_tokens) == (0.7, 0.8, 33)


def test_explicit_values_win_even_the_sampling_params_defaults():
    chat = _params(ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], temperature=1.0,
                                         max_completion_tokens=5))
    assert (chat.temperature, chat.top_p, chat.max_tokens) == (1.0, 0.8, 5)
    completion = _params(CompletionRequest(prompt="hi", top_p=1.0, max_tokens=16))
    assert (completion.temperature, completion.top_p, completion.max_tokens) == (0.7, 1.0, 16)


def test_no_defaults_leave_the_params_alone():
    body = CompletionRequest(prompt="hi")
    assert with_defaults(body.to_sampling_params(), body, None) == body.to_sampling_params()


def test_llm_uses_the_models_defaults_for_prompts_without_params(tmp_path):
    import shutil

    from serval import LLM
    from tests.e2e.server import tiny_model_dir

    shutil.copytree(tiny_model_dir(), tmp_path, dirs_exist_ok=True)
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "top_p": 0.8}))
    llm = LLM(model=str(tmp_path), max_model_len=64)
    assert (llm.get_default_sampling_params().temperature, llm.get_default_sampling_params().top_p) == (0.7, 0.8)
    assert LLM(model=str(tmp_path), max_model_len=64, generation_config="vllm").get_default_sampling_params() == \
        SamplingParams()
