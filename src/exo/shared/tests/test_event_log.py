from pathlib import Path

import pytest

from exo.shared.event_log import LOG_FILE_NAME, DiskEventLog
from exo.shared.event_store import EventStore
from exo.shared.types.events import ChunkGenerated, IndexedEvent, MasterElected, ProbeEmitted
from exo.shared.types.ids import NodeId, TaskId


def probe(index: int) -> IndexedEvent:
    return IndexedEvent(idx=index, event=ProbeEmitted(probe_id=str(index), sent_at=0.0))


def write_events(directory: Path, count: int) -> None:
    log = DiskEventLog(directory)
    log.open()
    for index in range(count):
        log.append(probe(index))
    log.close()


def test_round_trip(tmp_path: Path) -> None:
    write_events(tmp_path, 5)
    log = DiskEventLog(tmp_path)
    events = log.open()
    assert [event.idx for event in events] == [0, 1, 2, 3, 4]
    log.append(probe(5))
    log.close()
    assert len(DiskEventLog(tmp_path).open()) == 6


def test_truncated_last_record_is_cut(tmp_path: Path) -> None:
    write_events(tmp_path, 4)
    path = tmp_path / LOG_FILE_NAME
    data = path.read_bytes()
    path.write_bytes(data[:-10])  # power loss mid-write
    log = DiskEventLog(tmp_path)
    events = log.open()
    assert [event.idx for event in events] == [0, 1, 2]
    log.append(probe(3))  # appending continues cleanly after the cut
    log.close()
    assert [event.idx for event in DiskEventLog(tmp_path).open()] == [0, 1, 2, 3]


def test_corrupt_record_and_everything_after_is_cut(tmp_path: Path) -> None:
    write_events(tmp_path, 4)
    path = tmp_path / LOG_FILE_NAME
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = b'{"idx": 2, "event": {"kind": "garbage"}}\n'
    path.write_bytes(b"".join(lines))
    events = DiskEventLog(tmp_path).open()
    assert [event.idx for event in events] == [0, 1]
    assert path.stat().st_size == len(lines[0]) + len(lines[1])


def test_out_of_order_append_is_refused(tmp_path: Path) -> None:
    log = DiskEventLog(tmp_path)
    log.open()
    with pytest.raises(ValueError, match="expects index 0"):
        log.append(probe(3))


def test_ephemeral_events_are_elided_on_disk(tmp_path: Path) -> None:
    log = DiskEventLog(tmp_path)
    log.open()
    chunk = ChunkGenerated(task_id=TaskId("t"), chunk_index=0, text="secret text")
    log.append(IndexedEvent(idx=0, event=chunk))
    log.close()
    assert b"secret text" not in (tmp_path / LOG_FILE_NAME).read_bytes()
    (reloaded,) = DiskEventLog(tmp_path).open()
    assert reloaded.event.kind == "EventElided"
    assert reloaded.event.event_id == chunk.event_id


def test_store_reload_and_truncate(tmp_path: Path) -> None:
    store = EventStore(tmp_path)
    store.load()
    store.append(IndexedEvent(idx=0, event=MasterElected(master_node_id=NodeId("a"))))
    for index in range(1, 4):
        store.append(probe(index))
    store.truncate_after(1)
    assert store.last_idx == 1
    store.append(probe(2))
    store.close()
    reloaded = EventStore(tmp_path)
    reloaded.load()
    assert reloaded.last_idx == 2
    assert reloaded.state.master_node_id == NodeId("a")
    assert reloaded.state.last_event_applied_idx == 2


def test_store_keeps_only_recent_chunk_bodies_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("exo.shared.event_store.EPHEMERAL_BODIES_KEPT", 3)
    store = EventStore(None)
    for index in range(6):
        chunk = ChunkGenerated(task_id=TaskId("t"), chunk_index=index, text=f"piece {index}")
        store.append(IndexedEvent(idx=index, event=chunk))
    kinds = [event.event.kind for event in store.events_between(0, 5)]
    assert kinds == ["EventElided"] * 3 + ["ChunkGenerated"] * 3
    assert store.contains_event(store.events_between(0, 0)[0].event.event_id)
