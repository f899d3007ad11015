import errno
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from exo.shared.event_log import (
    LOG_FILE_NAME,
    DiskEventLog,
    LogDamagedError,
    LogWriteError,
    encode_record,
)
from exo.shared.event_store import EventStore
from exo.shared.types.events import IndexedEvent, MasterElected, ProbeEmitted
from exo.shared.types.ids import NodeId

NO_SPACE = os.strerror(errno.ENOSPC)


def probe(index: int) -> IndexedEvent:
    return IndexedEvent(idx=index, event=ProbeEmitted(probe_id=str(index), sent_at=0.0))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB filesystem, to fill up."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        pytest.skip("no mount command, so no small filesystem to fill")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def started_store(directory: Path) -> EventStore:
    store = EventStore(directory)
    store.load()
    store.append(IndexedEvent(idx=0, event=MasterElected(master_node_id=NodeId("a"))))
    return store


def reloaded(directory: Path) -> list[IndexedEvent]:
    return DiskEventLog(directory).open()


def assert_whole_records(directory: Path, expected: list[IndexedEvent]) -> None:
    """The file holds exactly the expected records: nothing torn, nothing more."""
    assert (directory / LOG_FILE_NAME).read_bytes() == b"".join(map(encode_record, expected))


def test_disk_full_on_a_real_filesystem(small_disk: Path, log_lines: list[str]) -> None:
    filler = small_disk / "filler"
    filler.write_bytes(b"x" * 48 * 1024)
    events = small_disk / "events"
    store = started_store(events)
    stored = list(store.events_between(0, 0))
    changes = store.subscribe()
    for index in range(1, 10_000):
        indexed, state_before = probe(index), store.state
        try:
            store.append(indexed)
        except LogWriteError as error:
            failure = error
            break
        stored.append(indexed)
    else:
        pytest.fail("the small disk never filled up")
    while True:  # drain what was appended before the disk filled
        try:
            changes.receive_nowait()
        except anyio.WouldBlock:
            break
    path = events / LOG_FILE_NAME
    message = f"cannot write the event log {path}: {NO_SPACE}"
    assert str(failure) == message
    assert failure.errno == errno.ENOSPC
    assert store.write_error == message
    assert store.last_idx == len(stored) - 1 > 10
    assert store.state is state_before
    assert store.event_at(len(stored)) is None
    with pytest.raises(anyio.WouldBlock):
        changes.receive_nowait()  # nobody heard of the failed event
    assert_whole_records(events, stored)

    filler.unlink()
    for index in range(len(stored), len(stored) + 5):
        indexed = probe(index)
        store.append(indexed)
        stored.append(indexed)
    assert store.write_error is None
    assert log_lines.count("INFO event log writable again") == 1
    assert sum(message in line for line in log_lines if line.startswith("ERROR")) == 1
    store.close()
    assert reloaded(events) == stored
    restarted = EventStore(events)
    restarted.load()
    assert restarted.last_idx == len(stored) - 1
    assert restarted.state.master_node_id == NodeId("a")
    restarted.close()


def test_disk_full_at_the_os_boundary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_lines: list[str]
) -> None:
    """The disk fills in the middle of a record: half of it is written, then ENOSPC."""
    store = started_store(tmp_path)
    stored = [*store.events_between(0, 0), probe(1)]
    store.append(stored[1])
    state_before = store.state
    real_pwrite = os.pwrite
    calls: list[int] = []

    def half_then_full(descriptor: int, data: bytes, offset: int) -> int:
        calls.append(offset)
        if len(calls) == 1:
            return real_pwrite(descriptor, bytes(data)[: len(data) // 2], offset)
        raise OSError(errno.ENOSPC, NO_SPACE)

    changes = store.subscribe()
    with monkeypatch.context() as patch:
        patch.setattr(os, "pwrite", half_then_full)
        with pytest.raises(LogWriteError, match=NO_SPACE):
            store.append(probe(2))
    assert len(calls) == 2
    assert store.last_idx == 1
    assert store.state is state_before
    assert store.write_error == f"cannot write the event log {tmp_path / LOG_FILE_NAME}: {NO_SPACE}"
    with pytest.raises(anyio.WouldBlock):
        changes.receive_nowait()
    assert_whole_records(tmp_path, stored)
    assert reloaded(tmp_path) == stored

    retried = probe(2)
    store.append(retried)
    stored.append(retried)
    assert store.write_error is None
    assert changes.receive_nowait() == retried
    assert log_lines.count("INFO event log writable again") == 1
    store.close()
    assert reloaded(tmp_path) == stored


def test_a_failed_fsync_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = started_store(tmp_path)
    store.append(probe(1))

    def failing_fsync(descriptor: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", failing_fsync)
        store.sync()  # the periodic sync must not bring the node down
    assert store.write_error is not None
    assert store.write_error.endswith(os.strerror(errno.EIO))
    store.append(probe(2))
    assert store.write_error is not None  # a working write says nothing of fsync
    store.sync()
    assert store.write_error is None
    store.close()
    assert [event.idx for event in reloaded(tmp_path)] == [0, 1, 2]


def test_a_failed_truncate_changes_nothing_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = started_store(tmp_path)
    for index in range(1, 4):
        store.append(probe(index))
    events_before, state_before = store.events_between(0, 3), store.state

    def failing_ftruncate(descriptor: int, length: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with monkeypatch.context() as patch:
        patch.setattr(os, "ftruncate", failing_ftruncate)
        with pytest.raises(LogWriteError):
            store.truncate_after(1)
    assert store.events_between(0, 3) == events_before
    assert store.state is state_before
    assert store.write_error is not None
    assert_whole_records(tmp_path, events_before)
    store.truncate_after(1)
    assert store.last_idx == 1
    assert store.write_error is None
    store.close()
    assert reloaded(tmp_path) == events_before[:2]


def test_load_raises_on_damage_and_salvages_when_asked(tmp_path: Path) -> None:
    store = started_store(tmp_path)
    for index in range(1, 6):
        store.append(probe(index))
    kept = store.events_between(0, 2)
    store.close()
    path = tmp_path / LOG_FILE_NAME
    lines = path.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3].replace(b'"probe_id":"3"', b'"probe_id":"4"')
    path.write_bytes(b"".join(lines))
    with pytest.raises(LogDamagedError) as raised:
        EventStore(tmp_path).load()
    assert raised.value.record_idx == 3
    salvaged = EventStore(tmp_path)
    salvaged.load(salvage=True)
    assert salvaged.events_between(0, 10) == kept
    assert salvaged.state.last_event_applied_idx == 2
    salvaged.append(probe(3))
    salvaged.close()
    assert len(reloaded(tmp_path)) == 4


def test_make_durable_fsyncs_once_for_all_and_reports_how_far_the_disk_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync
    calls: list[int] = []
    failing = [False]

    def counting_fsync(descriptor: int) -> None:
        calls.append(descriptor)
        if failing[0]:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(descriptor)

    store = started_store(tmp_path)
    for index in range(1, 5):
        store.append(probe(index))
    monkeypatch.setattr(os, "fsync", counting_fsync)
    assert store.durable_idx == -1  # written, not fsynced
    assert store.make_durable() == 4 and len(calls) == 1  # one fsync for all five
    assert store.make_durable() == 4 and len(calls) == 1  # nothing new: no fsync
    failing[0] = True
    store.append(probe(5))
    assert store.make_durable() == 4 and store.write_error is not None
    failing[0] = False
    assert store.make_durable() == 5 and store.write_error is None
    store.truncate_after(3)
    assert store.durable_idx == 3
    store.close()
    # What a restart reads may sit only in the page cache: durable after the first sync.
    again = EventStore(tmp_path)
    again.load()
    assert again.durable_idx == -1
    calls.clear()
    assert again.make_durable() == 3 and len(calls) == 1
    again.close()


def test_the_loop_goes_on_while_an_fsync_waits_on_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync
    entered, release = threading.Event(), threading.Event()
    threads: list[str] = []

    def slow_fsync(descriptor: int) -> None:
        threads.append(threading.current_thread().name)
        entered.set()
        assert release.wait(10)
        real_fsync(descriptor)

    store = started_store(tmp_path)
    store.append(probe(1))

    async def scenario() -> None:
        monkeypatch.setattr(os, "fsync", slow_fsync)
        durable: list[int] = []
        async with anyio.create_task_group() as group:

            async def make_durable() -> None:
                durable.append(await store.make_durable_in_thread())

            group.start_soon(make_durable)
            await anyio.to_thread.run_sync(entered.wait, 10)
            store.append(probe(2))  # the loop runs meanwhile
            release.set()
        assert durable == [1]
        assert await store.make_durable_in_thread() == 2

    anyio.run(scenario)
    assert threads and threading.main_thread().name not in threads
    store.close()
