"""The suffix index: the longest match in the request's history or recent requests, and its bound."""
from serval.engine.spec_decode.suffix import SuffixIndex


def test_proposes_from_a_finished_request():
    index = SuffixIndex(max_cached_requests=4, max_depth=8)
    index.add([10, 11, 12, 13, 14, 15, 16])
    assert index.propose([1, 2, 12, 13], 3) == [14, 15, 16]
    assert index.propose([1, 2, 99], 3) == []


def test_longest_match_wins_over_the_request_own_shorter_one():
    index = SuffixIndex(max_cached_requests=4, max_depth=8)
    index.add([7, 8, 9, 50, 51])
    # The request's own history matches only (9,) → 60; the cached sequence matches (7, 8, 9) → 50.
    assert index.propose([9, 60, 7, 8, 9], 2) == [50, 51]
    # A longer own match wins.
    assert index.propose([7, 8, 9, 61, 7, 8, 9], 2) == [61, 7]


def test_bounded_forgets_the_oldest():
    index = SuffixIndex(max_cached_requests=2, max_depth=8)
    index.add([1, 2, 3])
    index.add([4, 5, 6])
    index.add([7, 8, 9])
    assert len(index.sequences) == 2
    assert index.propose([0, 1, 2], 1) == []
    assert index.propose([0, 7, 8], 1) == [9]
    assert all(entry[0] in index.sequences for entries in index.occurrences.values() for entry in entries)
    assert 1 not in index.occurrences
