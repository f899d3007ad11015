import errno
import os
import random
import re
import shutil
import zlib
from pathlib import Path

import pytest

from exo.shared.event_log import (
    LOG_FILE_NAME,
    DiskEventLog,
    LogDamagedError,
    LogWriteError,
    encode_record,
)
from exo.shared.event_store import EventStore
from exo.shared.types.events import ChunkGenerated, IndexedEvent, MasterElected, ProbeEmitted
from exo.shared.types.ids import NodeId, TaskId

RECORD_LINE = re.compile(rb"([0-9a-f]{8}) (\{.*\})\n")


def probe(index: int) -> IndexedEvent:
    return IndexedEvent(idx=index, event=ProbeEmitted(probe_id=str(index), sent_at=0.0))


def write_events(directory: Path, count: int) -> list[IndexedEvent]:
    events = [probe(index) for index in range(count)]
    log = DiskEventLog(directory)
    log.open()
    for indexed in events:
        log.append(indexed)
    log.close()
    return events


def record_lines(directory: Path) -> list[bytes]:
    return (directory / LOG_FILE_NAME).read_bytes().splitlines(keepends=True)


def test_round_trip(tmp_path: Path) -> None:
    written = write_events(tmp_path, 5)
    for line in record_lines(tmp_path):
        match = RECORD_LINE.fullmatch(line)
        assert match is not None, line
        assert int(match.group(1), 16) == zlib.crc32(match.group(2))
    log = DiskEventLog(tmp_path)
    events = log.open()
    assert events == written
    log.append(probe(5))
    log.close()
    assert len(DiskEventLog(tmp_path).open()) == 6


def test_truncated_last_record_is_cut(tmp_path: Path, log_lines: list[str]) -> None:
    written = write_events(tmp_path, 4)
    path = tmp_path / LOG_FILE_NAME
    data = path.read_bytes()
    path.write_bytes(data[:-10])  # power loss mid-write
    log = DiskEventLog(tmp_path)
    events = log.open()
    assert events == written[:3]
    assert any("cutting" in line and line.startswith("WARNING") for line in log_lines)
    log.append(probe(3))  # appending continues cleanly after the cut
    log.close()
    assert [event.idx for event in DiskEventLog(tmp_path).open()] == [0, 1, 2, 3]


def test_last_line_without_its_line_end_is_cut(tmp_path: Path) -> None:
    written = write_events(tmp_path, 4)
    path = tmp_path / LOG_FILE_NAME
    whole = path.read_bytes()
    path.write_bytes(whole[:-1])  # only the newline of the last record is missing
    assert DiskEventLog(tmp_path).open() == written[:3]
    assert path.read_bytes() == b"".join(record_lines(tmp_path))
    assert path.stat().st_size == len(whole) - len(whole.splitlines(keepends=True)[-1])


def test_bad_checksum_on_the_last_line_is_cut(tmp_path: Path) -> None:
    written = write_events(tmp_path, 4)
    path = tmp_path / LOG_FILE_NAME
    lines = record_lines(tmp_path)
    checksum = lines[3][:8]
    lines[3] = f"{int(checksum, 16) ^ 1:08x}".encode() + lines[3][8:]
    path.write_bytes(b"".join(lines))
    assert DiskEventLog(tmp_path).open() == written[:3]
    assert path.read_bytes() == b"".join(lines[:3])


def test_damaged_record_before_the_last_raises_and_leaves_the_file(tmp_path: Path) -> None:
    write_events(tmp_path, 4)
    path = tmp_path / LOG_FILE_NAME
    lines = record_lines(tmp_path)
    lines[2] = b'{"idx": 2, "event": {"kind": "garbage"}}\n'
    path.write_bytes(b"".join(lines))
    with pytest.raises(LogDamagedError) as raised:
        DiskEventLog(tmp_path).open()
    assert raised.value.record_idx == 2
    assert raised.value.path == path
    assert str(raised.value) == (
        f"event log {path}: record 2 (line 3) is damaged (no checksum: a record of the old "
        f"format); the records before it are intact"
    )
    assert path.read_bytes() == b"".join(lines)


def test_a_record_with_the_wrong_index_before_the_last_is_damage(tmp_path: Path) -> None:
    write_events(tmp_path, 4)
    path = tmp_path / LOG_FILE_NAME
    lines = record_lines(tmp_path)
    lines[1] = encode_record(probe(7))
    path.write_bytes(b"".join(lines))
    with pytest.raises(
        LogDamagedError, match=r"record 1 \(line 2\) is damaged \(it holds index 7\)"
    ):
        DiskEventLog(tmp_path).open()


def flip_bit(data: bytes, position: int, bit: int) -> bytes:
    return data[:position] + bytes([data[position] ^ (1 << bit)]) + data[position + 1 :]


def assert_damage_found_at(directory: Path, data: bytes, record_idx: int) -> None:
    path = directory / LOG_FILE_NAME
    path.write_bytes(data)
    with pytest.raises(LogDamagedError) as raised:
        DiskEventLog(directory).open()
    assert raised.value.record_idx == record_idx
    assert f"record {record_idx} (line {record_idx + 1})" in str(raised.value)
    assert str(path) in str(raised.value)
    assert path.read_bytes() == data  # detection changes nothing


def test_single_bit_flips_before_the_last_record_are_detected(tmp_path: Path) -> None:
    write_events(tmp_path, 50)
    lines = record_lines(tmp_path)
    original = b"".join(lines)
    starts = [sum(len(line) for line in lines[:index]) for index in range(len(lines))]
    chooser = random.Random(20240611)
    flips = [
        (record, chooser.randrange(len(lines[record])), chooser.randrange(8))
        for record in (chooser.randrange(len(lines) - 1) for _ in range(400))
    ]
    # every line end too: a damaged newline merges the record with the next one
    flips += [(record, len(lines[record]) - 1, bit) for record in range(49) for bit in (0, 3)]
    for record, position_in_line, bit in flips:
        flipped = flip_bit(original, starts[record] + position_in_line, bit)
        assert_damage_found_at(tmp_path, flipped, record)


def test_a_change_that_leaves_valid_json_is_caught_by_the_checksum(tmp_path: Path) -> None:
    write_events(tmp_path, 10)
    lines = record_lines(tmp_path)
    match = RECORD_LINE.fullmatch(lines[6])
    assert match is not None
    body = match.group(2)
    id_start = body.index(b'"event_id":"') + len(b'"event_id":"')
    digit = body[id_start : id_start + 1]
    other = b"0" if digit != b"0" else b"1"
    changed = body[:id_start] + other + body[id_start + 1 :]
    edited = IndexedEvent.model_validate_json(changed)  # still a valid event, another id
    assert edited.event.event_id != IndexedEvent.model_validate_json(body).event.event_id
    lines[6] = lines[6].replace(body, changed)
    (tmp_path / LOG_FILE_NAME).write_bytes(b"".join(lines))
    with pytest.raises(
        LogDamagedError, match=r"record 6 \(line 7\) is damaged \(checksum mismatch\)"
    ):
        DiskEventLog(tmp_path).open()


def test_salvage_keeps_the_intact_prefix_and_sets_the_damaged_file_aside(
    tmp_path: Path, log_lines: list[str]
) -> None:
    written = write_events(tmp_path, 10)
    path = tmp_path / LOG_FILE_NAME
    lines = record_lines(tmp_path)
    damaged = flip_bit(b"".join(lines), sum(len(line) for line in lines[:4]) + 30, 2)
    path.write_bytes(damaged)
    with pytest.raises(LogDamagedError):
        DiskEventLog(tmp_path).open()
    log = DiskEventLog(tmp_path)
    assert log.salvage() == written[:4]
    (aside,) = tmp_path.glob(f"{LOG_FILE_NAME}.damaged-*")
    assert re.fullmatch(re.escape(LOG_FILE_NAME) + r"\.damaged-\d+", aside.name)
    assert aside.read_bytes() == damaged
    assert path.read_bytes() == b"".join(lines[:4])
    assert not list(tmp_path.glob("*.tmp"))
    assert any(str(aside) in line and str(path) in line for line in log_lines if "WARNING" in line)
    refetched = [probe(index) for index in range(4, 12)]  # the rest, from a peer
    for indexed in refetched:
        log.append(indexed)
    log.close()
    assert DiskEventLog(tmp_path).open() == written[:4] + refetched


def test_salvage_of_a_sound_log_just_opens_it(tmp_path: Path) -> None:
    written = write_events(tmp_path, 3)
    log = DiskEventLog(tmp_path)
    assert log.salvage() == written
    log.close()
    assert list(tmp_path.iterdir()) == [tmp_path / LOG_FILE_NAME]


def write_legacy(directory: Path, events: list[IndexedEvent]) -> bytes:
    """The format before checksums: one plain JSON line per event."""
    data = b"".join(indexed.model_dump_json().encode() + b"\n" for indexed in events)
    (directory / LOG_FILE_NAME).write_bytes(data)
    return data


def test_legacy_file_loads_and_is_rewritten_with_checksums(
    tmp_path: Path, log_lines: list[str]
) -> None:
    events = [probe(index) for index in range(6)]
    write_legacy(tmp_path, events)
    log = DiskEventLog(tmp_path)
    assert log.open() == events
    for line in record_lines(tmp_path):
        match = RECORD_LINE.fullmatch(line)
        assert match is not None
        assert int(match.group(1), 16) == zlib.crc32(match.group(2))
    assert sum("INFO" in line and "rewrote 6 records" in line for line in log_lines) == 1
    appended = probe(6)
    log.append(appended)
    log.close()
    assert DiskEventLog(tmp_path).open() == [*events, appended]
    assert sum("rewrote" in line for line in log_lines) == 1


def test_legacy_file_with_a_torn_last_line_is_cut_and_rewritten(tmp_path: Path) -> None:
    events = [probe(index) for index in range(4)]
    data = write_legacy(tmp_path, events)
    (tmp_path / LOG_FILE_NAME).write_bytes(data[:-5])
    assert DiskEventLog(tmp_path).open() == events[:3]
    assert [encode_record(indexed) for indexed in events[:3]] == record_lines(tmp_path)


def test_mixed_formats_are_damage(tmp_path: Path) -> None:
    events = [probe(index) for index in range(5)]
    path = tmp_path / LOG_FILE_NAME
    legacy = [indexed.model_dump_json().encode() + b"\n" for indexed in events]
    checksummed = [encode_record(indexed) for indexed in events]
    for lines, damaged_at in [
        (legacy[:2] + checksummed[2:], 2),
        (checksummed[:3] + legacy[3:], 3),
    ]:
        path.write_bytes(b"".join(lines))
        with pytest.raises(LogDamagedError) as raised:
            DiskEventLog(tmp_path).open()
        assert raised.value.record_idx == damaged_at
        assert path.read_bytes() == b"".join(lines)


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


def test_a_failed_write_leaves_only_whole_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills in the middle of a record, and cutting the partial record off fails
    too: the cut is made before the next write."""
    log = DiskEventLog(tmp_path)
    log.open()
    for index in range(3):
        log.append(probe(index))
    whole = (tmp_path / LOG_FILE_NAME).read_bytes()
    real_pwrite, real_ftruncate = os.pwrite, os.ftruncate
    calls: list[str] = []

    def most_then_full(descriptor: int, data: bytes, offset: int) -> int:
        calls.append("pwrite")
        if len(calls) == 1:
            return real_pwrite(descriptor, bytes(data)[:-1], offset)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def failing_ftruncate(descriptor: int, length: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "pwrite", most_then_full)
    monkeypatch.setattr(os, "ftruncate", failing_ftruncate)
    long_probe = ProbeEmitted(probe_id="a long probe id " * 8, sent_at=0.0)
    with pytest.raises(LogWriteError) as raised:
        log.append(IndexedEvent(idx=3, event=long_probe))
    path = tmp_path / LOG_FILE_NAME
    assert str(raised.value) == f"cannot write the event log {path}: No space left on device"
    assert raised.value.errno == errno.ENOSPC
    assert isinstance(raised.value, OSError)
    assert calls == ["pwrite", "pwrite"]
    assert len(path.read_bytes()) > len(whole + encode_record(probe(3)))  # still there
    # a crash now would leave a torn last record, cut by the next open
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(path, copy / LOG_FILE_NAME)
    assert [event.idx for event in DiskEventLog(copy).open()] == [0, 1, 2]

    monkeypatch.setattr(os, "pwrite", real_pwrite)
    monkeypatch.setattr(os, "ftruncate", real_ftruncate)
    retried = probe(3)
    log.append(retried)
    assert path.read_bytes() == whole + encode_record(retried)
    log.close()
    assert [event.idx for event in DiskEventLog(tmp_path).open()] == [0, 1, 2, 3]


def test_a_failed_fsync_writes_the_records_again_on_the_next_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = DiskEventLog(tmp_path)
    log.open()
    log.append(probe(0))
    log.sync()
    synced_end = (tmp_path / LOG_FILE_NAME).stat().st_size
    unsynced = [probe(1), probe(2)]
    for indexed in unsynced:
        log.append(indexed)
    real_fsync, real_pwrite = os.fsync, os.pwrite
    failures = [OSError(errno.EIO, os.strerror(errno.EIO))]
    writes: list[tuple[bytes, int]] = []

    def fsync_failing_once(descriptor: int) -> None:
        if failures:
            raise failures.pop()
        real_fsync(descriptor)

    def recording_pwrite(descriptor: int, data: bytes, offset: int) -> int:
        writes.append((bytes(data), offset))
        return real_pwrite(descriptor, data, offset)

    monkeypatch.setattr(os, "fsync", fsync_failing_once)
    monkeypatch.setattr(os, "pwrite", recording_pwrite)
    with pytest.raises(LogWriteError, match="Input/output error"):
        log.sync()
    assert log.sync_failed
    log.sync()
    assert not log.sync_failed
    assert writes == [(b"".join(map(encode_record, unsynced)), synced_end)]
    writes.clear()
    log.sync()  # nothing left to write again
    assert writes == []
    log.close()
    assert [event.idx for event in DiskEventLog(tmp_path).open()] == [0, 1, 2]


def test_a_failed_truncate_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_events(tmp_path, 4)
    log = DiskEventLog(tmp_path)
    log.open()
    before = (tmp_path / LOG_FILE_NAME).read_bytes()

    def failing_ftruncate(descriptor: int, length: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with monkeypatch.context() as patch:
        patch.setattr(os, "ftruncate", failing_ftruncate)
        with pytest.raises(LogWriteError):
            log.truncate_after(1)
    assert (tmp_path / LOG_FILE_NAME).read_bytes() == before
    with pytest.raises(ValueError, match="expects index 4"):
        log.append(probe(2))  # the offsets still count four records
    log.truncate_after(1)
    log.append(probe(2))
    log.close()
    assert [event.idx for event in DiskEventLog(tmp_path).open()] == [0, 1, 2]


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


def test_appends_go_on_while_an_fsync_runs_and_count_from_the_next_one(tmp_path: Path) -> None:
    log = DiskEventLog(tmp_path)
    log.open()
    for index in range(3):
        log.append(probe(index))
    pending = log.begin_sync()
    assert pending is not None and pending.last_idx == 2
    log.append(probe(3))  # while the fsync runs elsewhere
    log.finish_sync(pending, pending.fsync())
    assert log.durable_idx == 2, "the append after the fsync began is not covered by it"
    log.sync()
    assert log.durable_idx == 3
    assert log.begin_sync() is None, "nothing left to sync"
    log.close()
    assert [event.idx for event in DiskEventLog(tmp_path).open()] == [0, 1, 2, 3]


def test_an_fsync_begun_before_a_cut_or_a_reset_counts_for_nothing(tmp_path: Path) -> None:
    log = DiskEventLog(tmp_path)
    log.open()
    for index in range(4):
        log.append(probe(index))
    before_cut = log.begin_sync()
    assert before_cut is not None
    log.truncate_after(1)  # divergence repair while the fsync ran
    log.finish_sync(before_cut, before_cut.fsync())
    assert log.durable_idx == 1, "records 2 and 3 are gone; they cannot be durable"
    log.append(probe(2))
    before_reset = log.begin_sync()
    assert before_reset is not None
    log.reset(10)  # a snapshot from the master replaced the log meanwhile
    log.finish_sync(before_reset, before_reset.fsync())
    assert log.durable_idx == 9
    log.close()


def test_a_failed_fsync_on_another_thread_is_written_again(tmp_path: Path) -> None:
    log = DiskEventLog(tmp_path)
    log.open()
    log.append(probe(0))
    pending = log.begin_sync()
    assert pending is not None
    pending.fsync()  # closes its duplicate; the outcome handed over is a failure
    with pytest.raises(LogWriteError, match="Input/output error"):
        log.finish_sync(pending, OSError(errno.EIO, os.strerror(errno.EIO)))
    assert log.sync_failed and log.durable_idx == -1
    log.sync()
    assert not log.sync_failed and log.durable_idx == 0
    log.close()
