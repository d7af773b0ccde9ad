"""core_messages: the engine core's outputs as deltas. Every RequestOutput an in-process LLMEngine returns, sent
through OutputEncoder → pickle → OutputDecoder, comes out equal to itself (stop strings that hold text back,
n > 1, logprobs, prompt logprobs, aborts); errors keep their type and the field at fault."""
import pickle

import pytest

from serval.config import EngineConfig
from serval.engine import core_messages as messages
from serval.engine.engine import LLMEngine
from serval.openai.errors import InvalidArgument
from serval.outputs import CompletionOutput, Logprob, RequestOutput
from serval.sampling_params import SamplingParams
from tests.e2e.server import tiny_model_dir


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(EngineConfig(model=tiny_model_dir(), max_model_len=256, max_num_seqs=8,
                                  max_num_batched_tokens=16, num_gpu_blocks_override=128))


def round_trip(encoder, decoder, outputs):
    deltas = messages.loads(messages.dumps([encoder.encode(output) for output in outputs]))
    return [decoder.decode(delta) for delta in deltas]


def test_engine_outputs_survive_the_round_trip(engine):
    tokenizer = engine.tokenizer
    first_words = tokenizer.decode(engine.input_processor.tokenize_prompt("Once upon a time").token_ids[:1])
    requests = {
        "plain": ("Once upon a time", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)),
        "stop": ("Hello there, my friend", SamplingParams(max_tokens=30, temperature=0, stop=[" the", first_words],
                                                           ignore_eos=True)),
        "samples": ([5, 600, 7000, 42], SamplingParams(max_tokens=9, temperature=1.0, seed=3, n=3, logprobs=3,
                                                        prompt_logprobs=2, ignore_eos=True)),
        "aborted": ("A long story", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)),
    }
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    encoder, decoder = messages.OutputEncoder(), messages.OutputDecoder()
    seen, steps = set(), 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        assert round_trip(encoder, decoder, outputs) == outputs
        seen.update(output.request_id for output in outputs)
        steps += 1
        if steps == 4:
            engine.abort_request("aborted")
            encoder.forget("aborted")
            decoder.forget("aborted")
    assert seen == set(requests)
    assert not encoder._sent and not decoder._latest  # finished and aborted requests are forgotten


def test_text_that_shrinks_is_sent_whole():
    """The output processor only appends, but the encoder doesn't rely on it: a text that is not an extension of
    what was sent replaces it."""
    def output(text, token_ids, finished=False):
        return RequestOutput("r", "p", [1, 2], None, [CompletionOutput(0, text, token_ids, -1.5, [
            {t: Logprob(-0.5, 1, "x")} for t in token_ids], "stop" if finished else None)], finished)

    encoder, decoder = messages.OutputEncoder(), messages.OutputDecoder()
    sequence = [output("abc", [7]), output("ab", [7, 8]), output("abX", [7, 8, 9], finished=True)]
    assert round_trip(encoder, decoder, sequence) == sequence
    assert encoder.encode(output("abc", [7])).prompt_token_ids == [1, 2]


def test_later_deltas_leave_out_the_prompt():
    encoder = messages.OutputEncoder()
    first = encoder.encode(RequestOutput("r", "p", [1, 2, 3], None, [CompletionOutput(0, "a", [4], None, None)],
                                         False))
    second = encoder.encode(RequestOutput("r", "p", [1, 2, 3], None, [CompletionOutput(0, "ab", [4, 5], None,
                                                                                       None)], False))
    assert first.prompt_token_ids == [1, 2, 3] and second.prompt_token_ids is None
    assert second.completions[0].text == "b" and second.completions[0].new_token_ids == [5]


@pytest.mark.parametrize("error", [InvalidArgument("model", "invalid lora"), ValueError("bad value"),
                                   FileNotFoundError("no such model"), RuntimeError("CUDA out of memory")])
def test_errors_keep_their_kind_and_field(error):
    back = pickle.loads(pickle.dumps(messages.PortableError.of(error))).exception()
    assert isinstance(back, ValueError) == isinstance(error, ValueError)
    assert isinstance(back, FileNotFoundError) == isinstance(error, FileNotFoundError)
    assert str(error) in str(back)
    if isinstance(error, InvalidArgument):
        assert isinstance(back, InvalidArgument) and back.param == "model"
