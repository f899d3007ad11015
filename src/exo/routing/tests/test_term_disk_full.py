"""A node whose disk refuses the term file (full, failing) grants no vote and does not
stand, as Raft requires, yet never crashes: it still follows a newer term and notes
commits in memory, writes them once the disk takes them, and says so in one log line."""

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest
from loguru import logger

from exo.routing import term_store
from exo.routing.election import Election
from exo.routing.messages import VoteRequest
from exo.routing.router import Router, RouterConfig
from exo.routing.term_store import TERM_FILE, TermStore
from exo.routing.topics import Topics
from exo.shared.atomic_file import write_atomically
from exo.shared.event_store import EventStore
from exo.shared.types.events import IndexedEvent, MemberJoined
from exo.shared.types.ids import NodeId

A, B, C = NodeId("a"), NodeId("b"), NodeId("c")


class Disk:
    """The term file's write: the real one, or ENOSPC while full."""

    def __init__(self) -> None:
        self.full = False
        self.attempts = 0

    def write(self, path: Path, data: bytes) -> None:
        self.attempts += 1
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write_atomically(path, data)


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Disk:
    fake = Disk()
    monkeypatch.setattr(term_store, "write_atomically", fake.write)
    return fake


@pytest.fixture
def errors() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="ERROR")
    yield lines
    logger.remove(sink)


def election(
    home: Path,
    node: NodeId,
    members: list[NodeId],
    router: Router | None = None,
    started_at_us: int = 1,
    settle_s: float = 0.0,
) -> Election:
    """``node``, whose log holds ``members`` joining in term 1 and whose term file is in
    ``home``; on ``router`` (default: one never opened)."""
    store = EventStore(None)
    for idx, member in enumerate(members):
        store.append(IndexedEvent(idx=idx, term=1, event=MemberJoined(node_id=member)))
    home.mkdir(parents=True, exist_ok=True)
    terms = TermStore(home)
    terms.load()
    if router is None:
        router = Router(RouterConfig([], [], discovery=False))  # never opened
    return Election(router, Topics("test"), node, started_at_us, settle_s, store, terms)


def on_disk(home: Path) -> int:
    path = home / TERM_FILE
    return TermStore(home).load().term if path.exists() else 0


def vote(voter: Election, candidate: NodeId, term: int) -> bool:
    request = VoteRequest(candidate_id=candidate, term=term, last_event_idx=9, last_log_term=9)
    return voter._vote(request).granted  # pyright: ignore[reportPrivateUsage]


def test_no_vote_is_granted_that_cannot_be_stored(
    tmp_path: Path, disk: Disk, errors: list[str]
) -> None:
    voter = election(tmp_path, A, [])
    disk.full = True
    for term in (2, 3, 4):
        assert not vote(voter, B, term)
    refusal = voter._vote(  # pyright: ignore[reportPrivateUsage]
        VoteRequest(candidate_id=B, term=5, last_event_idx=9, last_log_term=9)
    )
    assert not refusal.granted and "cannot store its vote" in refusal.reason
    assert voter._terms.record.voted_for is None  # pyright: ignore[reportPrivateUsage]
    assert on_disk(tmp_path) == 0
    assert disk.attempts >= 4
    assert len(errors) == 1 and TERM_FILE in errors[0], errors  # one line, not one per try
    # Room again: the vote is given, and it is on disk before the reply.
    disk.full = False
    assert vote(voter, B, 5)
    assert TermStore(tmp_path).load().voted_for == B
    assert not vote(voter, C, 5)  # one vote per term still holds


@pytest.mark.anyio
async def test_a_node_that_cannot_store_its_term_does_not_stand(
    tmp_path: Path, disk: Disk, errors: list[str]
) -> None:
    candidate = election(tmp_path, A, [])
    disk.full = True
    for _ in range(3):
        assert not await candidate._stand()  # pyright: ignore[reportPrivateUsage]
    assert candidate.term == 0 and candidate.master_node_id is None
    assert on_disk(tmp_path) == 0
    assert len(errors) == 1, errors


def test_a_newer_term_is_followed_in_memory_and_written_when_the_disk_allows(
    tmp_path: Path, disk: Disk, errors: list[str]
) -> None:
    node = election(tmp_path, A, [])
    disk.full = True
    assert node.observe_term(4, B)  # no OSError from a router callback
    assert node.term == 4 and node.master_node_id == B
    assert not node.observe_term(3, C)
    assert on_disk(tmp_path) == 0
    assert not node._terms.flush()  # pyright: ignore[reportPrivateUsage]
    disk.full = False
    assert node._terms.flush()  # pyright: ignore[reportPrivateUsage]
    assert on_disk(tmp_path) == 4
    assert len(errors) == 1, errors


def test_a_commit_is_noted_in_memory_when_the_disk_refuses_it(
    tmp_path: Path, disk: Disk, errors: list[str]
) -> None:
    node = election(tmp_path, A, [A, B])
    disk.full = True
    node.note_commit(1)  # commits the membership change at index 1
    assert node.commit_idx == 1
    assert node._terms.record.membership_committed_idx == 1  # pyright: ignore[reportPrivateUsage]
    assert TermStore(tmp_path).load().membership_committed_idx == -1
    disk.full = False
    assert node._terms.flush()  # pyright: ignore[reportPrivateUsage]
    assert TermStore(tmp_path).load().membership_committed_idx == 1
    assert len(errors) == 1, errors
