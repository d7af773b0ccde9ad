"""The default model (SmolLM2-135M-Instruct) served for real: chat answers, streaming agrees, and the server's
text is the offline engine's text for the same prompt."""
import pytest

from tests.e2e.server import RemoteServer

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def server():
    remote = RemoteServer(["--max-model-len", "1024"])
    yield remote
    remote.close()


def test_default_model_is_listed(server):
    assert [model.id for model in server.client().models.list().data] == ["SmolLM2-135M-Instruct"]


def test_chat_stream_matches_non_stream_and_offline_engine(server):
    from serval import LLM, SamplingParams
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    client = server.client()
    kwargs = dict(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    full = client.chat.completions.create(**kwargs)
    streamed = "".join(chunk.choices[0].delta.content or ""
                       for chunk in client.chat.completions.create(**kwargs, stream=True) if chunk.choices)
    assert full.choices[0].message.content and streamed == full.choices[0].message.content
    offline = LLM(max_model_len=1024).chat(messages, SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
                                           use_tqdm=False)[0]
    assert full.choices[0].message.content == offline.outputs[0].text
    assert full.usage.prompt_tokens == len(offline.prompt_token_ids)
