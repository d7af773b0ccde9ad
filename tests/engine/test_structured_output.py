"""Structured outputs by constrained decoding: every sample of a random-weight model at temperature 1.0 parses and
validates, through a real `serval serve` (hundreds of samples, batched with n) and through LLM offline; bad or
unsupported constraints are 400s naming the field; compiled grammars are cached."""
import json
import logging
import re

import httpx
import jsonschema
import pytest

from tests.e2e.server import RemoteServer, tiny_model_dir
from serval.engine import structured_output as structured
from serval.openai.errors import InvalidArgument
from serval.sampling_params import SamplingParams, StructuredOutputsParams

MODEL = "tiny"
# Bounded strings and numbers: a random model picks among allowed tokens almost uniformly, so an unbounded
# string would run to max_tokens (it only closes when '"' wins a draw among ~49k tokens).
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "member", "tier"],
          "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0,
                                                                                "maximum": 150},
                         "member": {"type": "boolean"}, "tier": {"enum": ["gold", "silver", None]},
                         "tags": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                  "maxItems": 3}}}


@pytest.fixture(scope="module")
def server():
    remote = RemoteServer(["--model", tiny_model_dir(), "--max-model-len", "512", "--served-model-name", MODEL,
                           "--max-num-seqs", "256", "--max-n", "200"])
    yield remote
    remote.close()


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json={"model": MODEL, **body}, timeout=120)


def texts_of(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert all(choice["finish_reason"] == "stop" for choice in choices), [c["finish_reason"] for c in choices]
    return [choice["message"]["content"] if "message" in choice else choice["text"] for choice in choices]


def test_json_schema_outputs_validate_over_many_samples(server):
    response = post(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "A person, as JSON"}], "n": 200, "temperature": 1.0,
        "max_tokens": 120, "response_format": {"type": "json_schema",
                                               "json_schema": {"name": "person", "schema": PERSON}}})
    outputs = texts_of(response)
    assert len(outputs) == 200
    for text in outputs:
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(outputs)) > 100  # temperature 1.0 really samples


def test_regex_and_choice_over_many_samples(server):
    pattern = r"[A-Z][a-z]{1,5}-[0-9]{2,4}(\.[0-9])?"
    outputs = texts_of(post(server, "/v1/completions", {
        "prompt": "Code:", "n": 200, "temperature": 1.0, "max_tokens": 40, "structured_outputs": {"regex": pattern}}))
    assert all(re.fullmatch(pattern, text) for text in outputs), outputs[:5]
    colors = ["red", "green", "blue", "ultraviolet"]
    outputs = texts_of(post(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "A color"}], "n": 200, "temperature": 1.0,
        "structured_outputs": {"choice": colors}}))
    assert set(outputs) <= set(colors) and len(set(outputs)) > 1


def test_grammar_and_json_object(server):
    grammar = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    outputs = texts_of(post(server, "/v1/completions", {
        "prompt": "Sum:", "n": 50, "temperature": 1.0, "max_tokens": 60, "structured_outputs": {"grammar": grammar}}))
    assert all(re.fullmatch(r"\(\d{1,2}(\+\d{1,2})*\)", text) for text in outputs), outputs[:5]
    # Any JSON object: a random model rarely closes a free string, so only finished samples are checked.
    response = post(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "JSON"}], "n": 50, "temperature": 1.0, "max_tokens": 40,
        "response_format": {"type": "json_object"}})
    choices = response.json()["choices"]
    finished = [c["message"]["content"] for c in choices if c["finish_reason"] == "stop"]
    assert finished and all(isinstance(json.loads(text), dict) for text in finished)
    assert all(c["message"]["content"].startswith("{") for c in choices)


def test_streaming_structured_output(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": "JSON"}], "stream": True, "temperature": 1.0,
            "max_tokens": 120, "response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}}}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    jsonschema.validate(json.loads(text), PERSON)
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "stop"


@pytest.mark.parametrize("body, param", [
    ({"guided_json": {"type": "object"}}, "guided_json"),
    ({"guided_regex": "a+"}, "guided_regex"),
    ({"guided_choice": ["a"]}, "guided_choice"),
    ({"guided_grammar": "root ::= \"a\""}, "guided_grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, None),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
    ({"structured_outputs": {"json": {"type": "object"}, "disable_any_whitespace": True}},
     "structured_outputs.disable_any_whitespace"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "root ::= ( \"a\""}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, None),
    # Compiles, but past llguidance's limits: refused before the first token, not "stop" with text that
    # doesn't match.
    ({"structured_outputs": {"choice": [f"option number {i}" for i in range(10_000)]}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a{1000}{1000}"}}, "structured_outputs"),
])
def test_unknown_or_bad_structured_fields_are_400(server, body, param):
    response = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                     "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    if param is not None:
        assert error["param"] == param, error
    assert httpx.get(server.url + "/health").status_code == 200


# ---------------------------------------------------------------- offline: LLM and the module itself
@pytest.fixture(scope="module")
def llm():
    from serval import LLM
    return LLM(model=tiny_model_dir(), max_model_len=256, max_num_seqs=64)


def test_llm_structured_outputs_and_the_grammar_cache(llm):
    params = SamplingParams(n=64, temperature=1.0, max_tokens=30, seed=3,
                            structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2}"))
    compiler = llm.engine.grammar_compiler()
    before_misses, before_hits = compiler.misses, compiler.hits
    (output,) = llm.generate(["x"], params, use_tqdm=False)
    assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2}", c.text) and c.finish_reason == "stop" for c in output.outputs)
    # 64 samples, one compile: the other 63 deep-copied the cached matcher.
    assert compiler.misses - before_misses <= 1
    assert compiler.hits - before_hits >= 63


def test_concurrent_requests_for_one_new_grammar_compile_it_once(llm):
    """Sixteen threads asking at once for a grammar nobody compiled yet (a burst of tool calls carrying the same
    tools): one compile, fifteen waits, and every thread gets its own matcher."""
    import threading
    compiler = llm.engine.grammar_compiler()
    schema = {"type": "object", "properties": {"burst": {"type": "integer"}, "other": {"type": "string"}},
              "required": ["burst"]}
    params = StructuredOutputsParams(json=schema)
    before_misses, before_hits = compiler.misses, compiler.hits
    start = threading.Barrier(16)
    matchers = []

    def ask():
        start.wait()
        matchers.append(compiler.compile(params))

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert compiler.misses - before_misses == 1
    assert compiler.hits - before_hits == 15
    assert len({id(m) for m in matchers}) == 16


def test_min_tokens_cannot_break_a_finished_grammar(llm):
    params = SamplingParams(temperature=1.0, max_tokens=20, min_tokens=10,
                            structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    (output,) = llm.generate(["x"], params, use_tqdm=False)
    assert output.outputs[0].text in ("yes", "no") and output.outputs[0].finish_reason == "stop"


TOO_COMPLEX = {"choice-10k": StructuredOutputsParams(choice=[f"option number {i}" for i in range(10_000)]),
               "regex-a1000-1000": StructuredOutputsParams(regex="a{1000}{1000}")}


@pytest.mark.parametrize("name", list(TOO_COMPLEX))
def test_constraints_past_the_parser_limits_are_refused_before_the_first_token(llm, name, caplog):
    params = SamplingParams(max_tokens=5, structured_outputs=TOO_COMPLEX[name])
    for attempt in range(2):  # the second refusal comes from the compiled-grammar cache
        with caplog.at_level(logging.INFO):
            with pytest.raises(InvalidArgument, match="too complex for the grammar engine") as error:
                llm.generate(["x"], params, use_tqdm=False)
        assert error.value.param == "structured_outputs"
        assert len(str(error.value)) < 400
        assert not llm.engine.has_unfinished_requests()
    # Logged once, naming the grammar by a short hash; no record carries the grammar (100+ KB for the choice).
    refusals = [r for r in caplog.records if getattr(r, "grammar_sha256", None)]
    assert len(refusals) == 1 and len(refusals[0].grammar_sha256) == 16
    assert all(len(r.getMessage()) + len(str(r.__dict__)) < 2000 for r in caplog.records)
    ok = llm.generate(["x"], SamplingParams(max_tokens=5, structured_outputs=StructuredOutputsParams(choice=["a"])),
                      use_tqdm=False)
    assert ok[0].outputs[0].text == "a" and ok[0].outputs[0].finish_reason == "stop"


def test_a_limit_hit_during_generation_ends_with_an_error_not_stop(llm, caplog):
    """The probe at admission walks one path ('0' completes the choice); the sampler, pushed by logit_bias,
    takes the other ('z', after which 5,000 choices make an Earley row over the limit). The request ends with
    finish_reason "error" and its text is never reported as a complete match."""
    z = llm.get_tokenizer().encode("z")[0]
    choices = ["0"] + [f"z{i}" for i in range(5_000)]
    params = SamplingParams(temperature=0.0, max_tokens=10, logit_bias={z: 100.0},
                            structured_outputs=StructuredOutputsParams(choice=choices))
    with caplog.at_level(logging.INFO):
        (output,) = llm.generate(["x"], params, use_tqdm=False)
    assert output.outputs[0].finish_reason == "error"
    assert output.outputs[0].token_ids == [z] and output.outputs[0].text == ""  # the rejected token isn't text
    [record] = [r for r in caplog.records if r.getMessage() == "structured output failed during generation"]
    assert len(record.grammar_sha256) == 16 and "items; max is 2000" in record.error and len(record.error) <= 300
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.get_stats().num_free_blocks == llm.engine.get_stats().num_blocks


def test_structured_outputs_params_validation():
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams(regex="a", grammar="root ::= \"a\"")
    with pytest.raises(ValueError, match="structured_outputs.choice"):
        StructuredOutputsParams(choice="abc")
    assert StructuredOutputsParams(choice=["a", "b"]).kind == "choice"


def test_allowed_mask_unpacks_bits_and_pads():
    import torch
    bitmask = torch.tensor([[0b101, -1]], dtype=torch.int32)
    allowed = structured.allowed_mask(bitmask, 70)
    assert allowed.shape == (1, 70)
    assert allowed[0, :3].tolist() == [True, False, True] and not allowed[0, 3:32].any()
    assert allowed[0, 32:64].all() and not allowed[0, 64:].any()  # past the tokenizer: never allowed


def test_torch_unpack_equals_the_numpy_unpack():
    # What a GPU runs (the words unpacked on the device) against the host's unpack, on random words, a vocabulary
    # past the words (padding) and one inside them.
    import torch
    bitmask = torch.randint(-2**31, 2**31 - 1, (5, 4), dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    for vocab_size in (100, 128, 150):
        assert torch.equal(structured.unpack_disallowed(bitmask, vocab_size),
                           structured.disallowed_mask(bitmask, vocab_size))
