"""Prepacking: never over the budget, no padding, the head always progresses, first-fit decreasing."""
from hypothesis import given, settings
from hypothesis import strategies as st

from lenserve.scheduler.packing import prepack


def test_first_fit_decreasing_fills_the_budget():
    # Head 100 goes first; then 700 and 200 fit (largest first); 300 no longer fits; the rest
    # of the budget (24) is a chunk of the best-ranked candidate left out (300).
    assert prepack([100, 300, 700, 200], 1024) == [100, 24, 700, 200]


def test_head_is_chunked_when_longer_than_the_budget():
    assert prepack([5000, 10, 20], 2048) == [2048, 0, 0]


def test_no_chunking_leaves_long_prompts_waiting():
    assert prepack([5000, 10], 2048, allow_chunk=False) == [0, 0]
    assert prepack([10, 5000, 30], 100, allow_chunk=False) == [10, 0, 30]


def test_empty_and_exhausted():
    assert prepack([], 100) == []
    assert prepack([5, 6], 0) == [0, 0]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 5000), max_size=40), st.integers(1, 8192), st.booleans())
def test_packing_properties(sizes, budget, chunk):
    takes = prepack(sizes, budget, chunk)
    assert len(takes) == len(sizes)
    assert sum(takes) <= budget  # never over the step's token budget
    assert all(0 <= t <= s for t, s in zip(takes, sizes))  # no padding: only real prompt tokens
    chunks = [i for i, (t, s) in enumerate(zip(takes, sizes)) if 0 < t < s]
    if not chunk:
        assert not chunks
    assert len(chunks) <= 2  # the head's, and the one that takes what is left
    if sizes and chunk:
        assert takes[0] == min(sizes[0], budget)  # the head always makes progress
        if sum(takes) < budget:
            assert all(t == s for t, s in zip(takes, sizes))  # budget left only when everything fits
    # First-fit decreasing: a candidate left out entirely is larger than the budget left when
    # its turn came, so it is larger than what was left at the end.
    head_blocked = not chunk and sizes and sizes[0] > budget  # then nothing passes the head
    left = budget - sum(takes)
    assert head_blocked or all(s > left for t, s in zip(takes, sizes) if t == 0)
