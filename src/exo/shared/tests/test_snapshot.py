"""Snapshots bound the log: the state at a committed index replaces the events before it,
on disk and in memory, and survives a restart (also one between the two steps)."""

from pathlib import Path

import pytest

from exo.shared.event_log import LOG_FILE_NAME, LogDamagedError
from exo.shared.event_store import EventStore
from exo.shared.snapshot import (
    SNAPSHOT_FILE_NAME,
    Snapshot,
    SnapshotDamagedError,
    read_snapshot,
    write_snapshot,
)
from exo.shared.types.events import IndexedEvent, MemberJoined
from exo.shared.types.ids import NodeId


def member(index: int) -> MemberJoined:
    return MemberJoined(node_id=NodeId(f"n{index}"))


def filled(directory: Path, count: int, compact_after: int, commit: bool) -> EventStore:
    store = EventStore(directory)
    store.load()
    store.compact_after = compact_after
    for idx in range(count):
        store.append(IndexedEvent(idx=idx, term=1, event=member(idx)))
        if commit:
            store.compact_if_due(idx)
    return store


def log_indices(directory: Path) -> list[int]:
    lines = (directory / LOG_FILE_NAME).read_bytes().splitlines()
    return [IndexedEvent.model_validate_json(line[9:]).idx for line in lines]


def test_committed_events_are_compacted_and_the_state_survives_a_restart(tmp_path: Path) -> None:
    store = filled(tmp_path, 25, compact_after=10, commit=True)
    assert store.base == 20 and store.last_idx == 24 and store.last_term == 1
    assert store.event_at(5) is None and store.event_at(22) is not None
    assert store.events_between(0, 24)[0].idx == 20
    assert log_indices(tmp_path) == [20, 21, 22, 23, 24]
    members = store.state.members
    assert len(members) == 25
    store.close()
    reloaded = EventStore(tmp_path)
    reloaded.load()
    assert reloaded.state == store.state
    assert (reloaded.base, reloaded.last_idx) == (20, 24)
    reloaded.append(IndexedEvent(idx=25, term=2, event=member(25)))
    assert reloaded.last_term == 2


def test_uncommitted_events_are_never_compacted(tmp_path: Path) -> None:
    store = filled(tmp_path, 25, compact_after=10, commit=False)
    store.compact_if_due(23)  # one event still uncommitted
    assert store.base == 0 and log_indices(tmp_path)[0] == 0
    store.compact_if_due(24)
    assert store.base == 25 and store.last_idx == 24 and store.last_term == 1


def test_a_crash_between_snapshot_and_compaction_loses_nothing(tmp_path: Path) -> None:
    store = filled(tmp_path, 12, compact_after=1000, commit=True)
    first_eight = EventStore(None)
    for idx in range(8):
        first_eight.append(IndexedEvent(idx=idx, term=1, event=member(idx)))
    write_snapshot(tmp_path, Snapshot(idx=7, term=1, state=first_eight.state))
    expected = store.state
    store.close()
    reloaded = EventStore(tmp_path)
    reloaded.load()
    assert reloaded.state == expected and reloaded.base == 8 and reloaded.last_idx == 11
    assert log_indices(tmp_path) == [8, 9, 10, 11]


def test_cuts_stop_at_the_snapshot_and_a_peer_snapshot_replaces_the_log(tmp_path: Path) -> None:
    store = filled(tmp_path, 25, compact_after=10, commit=True)
    store.truncate_after(21)
    assert store.last_idx == 21 and len(store.state.members) == 22
    with pytest.raises(ValueError, match="snapshot"):
        store.truncate_after(10)
    peer = filled(tmp_path / "peer", 40, compact_after=30, commit=True)
    snapshot = peer.snapshot()
    assert snapshot is not None and snapshot.idx == 29
    store.install_snapshot(snapshot)
    assert (store.base, store.last_idx, store.state) == (30, 29, snapshot.state)
    store.close()
    reloaded = EventStore(tmp_path)
    reloaded.load()
    assert reloaded.state == snapshot.state and reloaded.last_idx == 29


def test_a_damaged_snapshot_is_named(tmp_path: Path) -> None:
    filled(tmp_path, 12, compact_after=10, commit=True).close()
    path = tmp_path / SNAPSHOT_FILE_NAME
    data = bytearray(path.read_bytes())
    data[20] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotDamagedError, match=SNAPSHOT_FILE_NAME):
        read_snapshot(tmp_path)


def test_damage_after_a_snapshot_names_the_files_line(tmp_path: Path) -> None:
    filled(tmp_path, 15, compact_after=10, commit=True).close()  # the file holds 10..14
    path = tmp_path / LOG_FILE_NAME
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"idx":12', b'"idx":12 ')  # same JSON, wrong checksum
    path.write_bytes(b"".join(lines))
    store = EventStore(tmp_path)
    with pytest.raises(LogDamagedError, match=r"record 12 \(line 3\)"):
        store.load()
