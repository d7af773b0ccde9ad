"""The spec_decode_* counters under serval: (vLLM's names) and the acceptance length in outputs and the request log,
from a real engine run."""
from prometheus_client.parser import text_string_to_metric_families

from serval import SamplingParams
from serval.server.metrics import ServerMetrics
from serval.server.request_log import RequestRecord
from tests.engine.spec_decode.test_spec_engine import NGRAM, repetitive_prompts
from tests.engine.test_engine import pressured_llm


def test_counters_and_acceptance_length(tiny_models):
    path, hf_model = tiny_models("llama")
    llm = pressured_llm(path, True, speculative_config=NGRAM)
    prompts = repetitive_prompts(hf_model.config.vocab_size)[:6]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    spec = llm.engine.get_stats().spec_decode
    assert spec.num_drafts > 0

    samples = {}
    for family in text_string_to_metric_families(ServerMetrics("tiny", llm.engine.get_stats).render().decode()):
        for sample in family.samples:
            samples[(sample.name, sample.labels.get("position"))] = sample.value
    assert samples[("serval:spec_decode_num_drafts_total", None)] == spec.num_drafts
    assert samples[("serval:spec_decode_num_draft_tokens_total", None)] == spec.num_draft_tokens
    assert samples[("serval:spec_decode_num_accepted_tokens_total", None)] == spec.num_accepted_tokens
    per_position = [samples[("serval:spec_decode_num_accepted_tokens_per_pos_total", str(j))]
                    for j in range(NGRAM["num_speculative_tokens"])]
    assert per_position == spec.num_accepted_tokens_per_pos
    assert per_position == sorted(per_position, reverse=True)  # position j is reached only through j - 1

    lengths = [output.metrics.spec_decode_acceptance_length for output in outputs]
    assert any(length is not None and length > 1.0 for length in lengths)
    for length in lengths:
        assert length is None or 1.0 <= length <= 1 + NGRAM["num_speculative_tokens"]
    record = RequestRecord("r", "tiny", "text_completion")
    speculated = next(output for output, length in zip(outputs, lengths) if length is not None)
    record.add_finished(speculated)
    expected = round(speculated.metrics.spec_decode_acceptance_length, 3)
    assert record.fields()["spec_decode_acceptance_length"] == expected
