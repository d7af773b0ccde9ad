"""SpecDecoder.propose: which requests speculate and how many drafts they get."""
from serval.engine.request import Request
from serval.engine.spec_decode.config import SpeculativeConfig
from serval.engine.spec_decode.decoder import SpecDecoder, can_speculate
from serval.sampling_params import SamplingParams

REPEATING = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]  # prompt lookup proposes 7, 8, 5, ...


def decoding(**params) -> Request:
    request = Request("r", list(REPEATING), SamplingParams(**{"max_tokens": 50, **params}), None, 128)
    request.num_computed_tokens = request.num_tokens - 1
    return request


def test_decoding_requests_speculate_unless_they_opt_out():
    assert can_speculate(decoding())
    assert not can_speculate(decoding(disable_speculation=True))
    # Verification processes each row as if the drafts before it were output (test_spec_penalties).
    assert can_speculate(decoding(repetition_penalty=1.2))
    assert can_speculate(decoding(presence_penalty=0.5))
    assert can_speculate(decoding(min_tokens=3))
    prefilling = decoding()
    prefilling.num_computed_tokens = 3
    assert not can_speculate(prefilling)


def test_drafts_fit_max_tokens_and_the_batch_limit_turns_speculation_off():
    decoder = SpecDecoder(SpeculativeConfig("ngram", 4, disable_by_batch_size=3), vocab_size=32)
    requests = [decoding(), decoding(max_tokens=3), decoding(disable_speculation=True)]
    decoder.propose(requests[:2])
    assert requests[0].spec_token_ids == [7, 8, 5, 6]
    assert requests[1].spec_token_ids == [7, 8]  # 2 drafts + 1 token of the target's = max_tokens
    decoder.propose(requests)
    assert all(request.spec_token_ids == [] for request in requests)
    assert decoder.stats.num_disabled_steps == 1
