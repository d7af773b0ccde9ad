"""core_messages: the engine core's outputs as deltas. The engine-core process's engine builds OutputDeltas
(LLMEngine(delta_outputs=True)); through pickle and OutputDecoder they come out equal to the RequestOutputs the
in-process engine builds from the same state (stop strings that hold text back, n > 1, logprobs, prompt
logprobs, final-only requests, aborts); errors keep their type and the field at fault."""
import dataclasses
import pickle

import pytest

from serval.config import EngineConfig
from serval.engine import core_messages as messages
from serval.engine.engine import LLMEngine
from serval.openai.errors import InvalidArgument
from serval.engine.output_processor import OutputProcessor, _request_output
from serval.engine.request import Request, RequestStatus
from serval.outputs import Logprob
from serval.sampling_params import SamplingParams
from tests.e2e.server import tiny_model_dir


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(EngineConfig(model=tiny_model_dir(), max_model_len=256, max_num_seqs=8,
                                  max_num_batched_tokens=16, num_gpu_blocks_override=128), delta_outputs=True)


def test_deltas_rebuild_the_in_process_outputs(engine, monkeypatch):
    """Each step, the RequestOutputs the API process rebuilds equal those the in-process engine builds from the
    same state (make_outputs' _request_output, taken just before make_deltas): text, token ids, logprobs, prompt
    logprobs, finish and stop reasons, metrics, for every sample, in order."""
    expected_per_step = []
    make_deltas = engine.output_processor.make_deltas

    def make_both(states):
        expected_per_step.append([_request_output(state) for state in states])
        return make_deltas(states)

    tokenizer = engine.tokenizer
    first_words = tokenizer.decode(engine.input_processor.tokenize_prompt("Once upon a time").token_ids[:1])
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    engine.add_request("probe", "Once upon a time", greedy)
    decoder = messages.OutputDecoder()
    while engine.has_unfinished_requests():
        probe = [decoder.decode(delta) for delta in engine.step()][-1].outputs[0]
    monkeypatch.setattr(engine.output_processor, "make_deltas", make_both)
    # Stops that the greedy answer meets: a token id and a string from its middle (text held back, then cut).
    stop_string = tokenizer.decode(probe.token_ids[6:8])
    requests = {
        "plain": ("Once upon a time", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)),
        "stop-token": ("Once upon a time", dataclasses.replace(greedy, stop_token_ids=[probe.token_ids[4]])),
        "stop-string": ("Once upon a time", dataclasses.replace(greedy, stop=[stop_string])),
        "stop": ("Hello there, my friend", SamplingParams(max_tokens=30, temperature=0, stop=[" the", first_words],
                                                           ignore_eos=True)),
        "samples": ([5, 600, 7000, 42], SamplingParams(max_tokens=9, temperature=1.0, seed=3, n=3, logprobs=3,
                                                        prompt_logprobs=2, ignore_eos=True)),
        "final-only": ([5, 6, 7], SamplingParams(max_tokens=5, temperature=1.0, seed=4, n=2, logprobs=1,
                                                 ignore_eos=True)),
        "aborted": ("A long story", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)),
    }
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params, stream=request_id != "final-only")
    seen, steps, num_outputs, last = set(), 0, 0, {}
    while engine.has_unfinished_requests():
        deltas = messages.loads(messages.dumps(engine.step()))
        outputs = [decoder.decode(delta) for delta in deltas]
        assert outputs == expected_per_step[-1]
        for output in outputs:  # the metrics move as the engine's clock does
            metrics = output.metrics
            assert metrics.first_scheduled_time <= metrics.first_token_time <= metrics.last_token_time
            if output.request_id in last:
                assert metrics.last_token_time > last[output.request_id].metrics.last_token_time
            last[output.request_id] = output
        seen.update(delta[0] for delta in deltas)
        num_outputs += len(deltas)
        steps += 1
        if "aborted" in seen and "aborted" in engine.output_processor.request_states:  # it streamed: abort it
            engine.abort_request("aborted")
            decoder.forget("aborted")
    assert seen == set(requests) and num_outputs > 2 * steps
    assert not decoder._latest  # finished and aborted requests are forgotten
    assert all(output.finished and output.metrics.finished_time >= output.metrics.last_token_time
               for output in last.values() if output.request_id != "aborted")
    assert last["stop-token"].outputs[0].stop_reason == probe.token_ids[4]
    assert last["stop-string"].outputs[0].stop_reason == stop_string


def test_deltas_send_what_is_new():
    """The prompt once, then each step's new text and token ids only (not the whole output again)."""
    processor = OutputProcessor(None)
    request = Request("r", [1, 2, 3], SamplingParams(max_tokens=8), eos_token_id=None, max_model_len=64,
                      parent_request_id="r")
    state = processor.new_request_state("r", "p", [1, 2, 3], [request])
    processor.add_request(state)
    sequence = state.sequences[0]
    deltas = []
    for token_id, text in ((4, "a"), (5, "ab")):
        request.append_output_token(token_id)
        sequence.text = text
        deltas.append(processor.make_deltas([state])[0])
    (_, [first], _, _, prompt), (_, [second], _, _, no_prompt) = deltas
    assert prompt == ("p", [1, 2, 3], None) and no_prompt is None
    assert first[1:4] == ("a", False, [4]) and second[1:4] == ("b", False, [5])


def test_text_that_shrinks_is_sent_whole():
    """A grammar's rejected token takes its text back: a text that is not an extension of what was sent replaces
    it."""
    processor = OutputProcessor(None)
    request = Request("r", [1, 2], SamplingParams(max_tokens=8, logprobs=0), eos_token_id=None, max_model_len=64,
                      parent_request_id="r")
    state = processor.new_request_state("r", "p", [1, 2], [request])
    processor.add_request(state)
    sequence = state.sequences[0]
    decoder = messages.OutputDecoder()
    for token_id, text in ((7, "abc"), (8, "ab"), (9, "abX")):
        request.append_output_token(token_id)
        sequence.logprobs.append({token_id: Logprob(-0.5, 1, "x")})
        sequence.cumulative_logprob -= 0.5
        sequence.text = text
        if token_id == 9:
            sequence.status = RequestStatus.FINISHED_STOPPED
        expected = _request_output(state)
        assert decoder.decode(messages.loads(messages.dumps(processor.make_deltas([state])))[0]) == expected
    assert not processor.request_states and not decoder._latest


@pytest.mark.parametrize("error", [InvalidArgument("model", "invalid lora"), ValueError("bad value"),
                                   FileNotFoundError("no such model"), RuntimeError("CUDA out of memory")])
def test_errors_keep_their_kind_and_field(error):
    back = pickle.loads(pickle.dumps(messages.PortableError.of(error))).exception()
    assert isinstance(back, ValueError) == isinstance(error, ValueError)
    assert isinstance(back, FileNotFoundError) == isinstance(error, FileNotFoundError)
    assert str(error) in str(back)
    if isinstance(error, InvalidArgument):
        assert isinstance(back, InvalidArgument) and back.param == "model"
