"""The commit rule: the highest index a majority stores, of the master's own term."""

from collections.abc import Callable, Collection

from hypothesis import given
from hypothesis import strategies as st

from exo.master.commit import next_commit_idx
from exo.routing.quorum import is_majority
from exo.shared.types.ids import NodeId

A, B, C, D, E = (NodeId(n) for n in "abcde")
FIVE = {A, B, C, D, E}


def majority_of(members: set[NodeId]) -> Callable[[Collection[NodeId]], bool]:
    return lambda agreeing: is_majority(agreeing, members, members, A, two_committed=True)


def test_the_highest_index_a_majority_stores_is_committed() -> None:
    terms = [1] * 10
    stored = {A: 9, B: 7, C: 4, D: 2, E: -1}
    found = next_commit_idx(stored, 9, -1, 1, terms.__getitem__, majority_of(FIVE))
    assert found == 4, "A, B and C store 4; only A and B store 7"
    assert next_commit_idx(stored, 9, 4, 1, terms.__getitem__, majority_of(FIVE)) is None


def test_an_index_of_an_older_term_is_never_committed_by_counting() -> None:
    terms = [1, 1, 1, 2, 2]  # the master is of term 3 and has indexed nothing yet
    stored = dict.fromkeys(FIVE, 4)
    assert next_commit_idx(stored, 4, -1, 3, terms.__getitem__, majority_of(FIVE)) is None
    terms.append(3)
    stored = {A: 5, B: 5, C: 5, D: 4, E: 4}
    assert next_commit_idx(stored, 5, -1, 3, terms.__getitem__, majority_of(FIVE)) == 5


def test_a_report_past_the_masters_log_counts_up_to_its_end() -> None:
    terms = [1] * 3
    stored = {A: 2, B: 8, C: 8}  # ahead: acknowledgements of a log being cut back
    assert next_commit_idx(stored, 2, -1, 1, terms.__getitem__, majority_of({A, B, C})) == 2


def brute_force(
    stored: dict[NodeId, int], last_idx: int, commit_idx: int, term: int, terms: list[int]
) -> int | None:
    """The rule as written: from the last index down, the first a majority stores."""
    for idx in range(last_idx, commit_idx, -1):
        if terms[idx] != term:
            return None
        if majority_of(FIVE)([node for node, up_to in stored.items() if up_to >= idx]):
            return idx
    return None


@given(
    st.lists(st.integers(0, 3), min_size=1, max_size=30).map(sorted),
    st.lists(st.integers(-1, 35), min_size=5, max_size=5),
    st.integers(-1, 29),
)
def test_it_agrees_with_counting_every_index(
    terms: list[int], reports: list[int], commit_idx: int
) -> None:
    last_idx = len(terms) - 1
    stored = dict(zip(sorted(FIVE), reports, strict=True))
    term = terms[-1]
    found = next_commit_idx(
        stored, last_idx, commit_idx, term, terms.__getitem__, majority_of(FIVE)
    )
    assert found == brute_force(stored, last_idx, commit_idx, term, terms)
