"""A node's copy of the global log and the state derived from it, kept on disk.

Every change goes to disk first and to memory only once the disk took it: when the disk
cannot be written (full, failing) the store raises ``LogWriteError``, keeps its log and
state as they were, and remembers the failure in ``write_error`` until a write succeeds
again.

The log is bounded: once :data:`COMPACT_AFTER` events have piled up since the last
snapshot and all of them are committed, the store writes a snapshot of the state
(:mod:`exo.shared.snapshot`) and the disk log drops the records it covers. Indices go on
from there; ``base`` is the first index still held as an event.

Appends are not fsynced one by one: the disk log is fsynced on a timer and by
:meth:`EventStore.make_durable`, which a node calls before it counts or acknowledges events
as stored (Raft's stable storage); :attr:`EventStore.durable_idx` is how far that holds.
A node's event loop uses :meth:`EventStore.make_durable_in_thread`, which waits for the
fsync on a worker thread.

Single-threaded by design: it is only touched from the event loop thread (the worker
thread of an fsync only fsyncs a duplicate of the log's descriptor).
"""

import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from loguru import logger

from exo.shared.apply import apply
from exo.shared.event_log import DiskEventLog, LogWriteError
from exo.shared.snapshot import Snapshot, read_snapshot, write_snapshot
from exo.shared.types.events import IndexedEvent, elided
from exo.shared.types.ids import EventId
from exo.shared.types.state import State

EPHEMERAL_BODIES_KEPT = 10_000
COMPACT_AFTER = 4_000
"""Events held since the last snapshot before the next one is taken."""


class EventStore:
    def __init__(self, events_directory: Path | None) -> None:
        self._directory = events_directory
        self._disk = DiskEventLog(events_directory) if events_directory is not None else None
        self._base = 0
        self._base_state = State()
        self._base_term = 0
        self.compact_after = COMPACT_AFTER
        self._membership_idx = -1
        self._events: list[IndexedEvent] = []
        self._applied_at: list[float] = []
        self._event_ids: set[EventId] = set()
        self._state = State()
        self._changed = anyio.Event()
        self._subscribers: list[MemoryObjectSendStream[IndexedEvent]] = []
        self._write_error: str | None = None
        self._write_error_source: Literal["write", "sync"] = "write"
        self._fsync_in_thread = anyio.Lock()

    def load(self, *, salvage: bool = False) -> None:
        """Open the disk log and rebuild state from it. Raises LogDamagedError when a record
        before the last is damaged; with salvage, keeps the intact records before it instead
        (the damaged file is set aside) and the node catches up on the rest from a peer."""
        if self._disk is None or self._directory is None:
            return
        snapshot = read_snapshot(self._directory)
        if snapshot is not None:
            self._start_from(snapshot)
        base = self._base
        for indexed in self._disk.salvage(base) if salvage else self._disk.open(base):
            if indexed.idx >= base:
                self._apply_in_memory(indexed)
        if self._disk.base < base:
            self._disk.compact(base)  # the snapshot was written, the compaction not yet
        if snapshot is not None or self._events:
            logger.info(
                f"reloaded {len(self._events)} events from {self._disk.path}"
                + (f" after a snapshot at {snapshot.idx}" if snapshot is not None else "")
            )

    def _start_from(self, snapshot: Snapshot) -> None:
        self._base = snapshot.idx + 1
        self._base_state = snapshot.state
        self._base_term = snapshot.term
        self._reset_to_base()

    def _reset_to_base(self) -> None:
        """Hold no event: the state is the snapshot's (the empty state without one)."""
        self._events, self._applied_at, self._event_ids = [], [], set()
        self._state = self._base_state
        self._membership_idx = self._base - 1 if self._base_state.members else -1

    @property
    def state(self) -> State:
        return self._state

    @property
    def write_error(self) -> str | None:
        """Why the last write to the disk log failed (one sentence), or None once writing
        works again."""
        return self._write_error

    @property
    def base(self) -> int:
        """The first index held as an event (the ones before it are in the snapshot)."""
        return self._base

    @property
    def last_idx(self) -> int:
        return self._base + len(self._events) - 1

    @property
    def last_term(self) -> int:
        """The term of the last event (of the snapshot's, when no event follows it)."""
        return self._events[-1].term if self._events else self._base_term

    @property
    def membership_idx(self) -> int:
        """Index of the last event that changed the members (-1: none); a snapshot counts
        as its last index."""
        return self._membership_idx

    def contains_event(self, event_id: EventId) -> bool:
        return event_id in self._event_ids

    def event_at(self, idx: int) -> IndexedEvent | None:
        position = idx - self._base
        return self._events[position] if 0 <= position < len(self._events) else None

    def events_between(self, first_idx: int, last_idx: int) -> list[IndexedEvent]:
        """Events with first_idx <= idx <= last_idx that this store holds."""
        end = last_idx + 1 - self._base
        if end <= 0:
            return []
        return self._events[max(first_idx - self._base, 0) : end]

    def applied_at(self, idx: int) -> float:
        return self._applied_at[idx - self._base]

    def snapshot(self) -> Snapshot | None:
        """The state at base - 1, for a peer whose log must start past it (None before the
        first compaction)."""
        if self._base == 0:
            return None
        return Snapshot(idx=self._base - 1, term=self._base_term, state=self._base_state)

    def compact_if_due(self, commit_idx: int) -> None:
        """Take a snapshot at the last event and drop the events it covers, when enough
        have piled up and all of them are committed (only committed events are final)."""
        if len(self._events) < self.compact_after or commit_idx < self.last_idx:
            return
        snapshot = Snapshot(idx=self.last_idx, term=self.last_term, state=self._state)
        if self._disk is not None and self._directory is not None:
            try:
                size = write_snapshot(self._directory, snapshot)
                self._disk.compact(snapshot.idx + 1)
            except OSError as error:
                logger.warning(f"cannot compact the event log: {error}; trying again later")
                return
            logger.info(
                f"snapshot at event {snapshot.idx} ({size} bytes); dropped "
                f"{len(self._events)} events from the log"
            )
        self._start_from(snapshot)

    def install_snapshot(self, snapshot: Snapshot) -> None:
        """Replace this node's log by a peer's snapshot (its events before it are gone
        from the cluster). Raises OSError, changing nothing, when it cannot be stored."""
        if self._disk is not None and self._directory is not None:
            write_snapshot(self._directory, snapshot)
            self._disk.reset(snapshot.idx + 1)
        logger.info(f"installed a snapshot at event {snapshot.idx} (term {snapshot.term})")
        self._start_from(snapshot)
        self._signal_change()

    def append(self, indexed: IndexedEvent) -> None:
        """Persist and apply the next event. Raises EventOutOfOrderError if it isn't next,
        and LogWriteError, changing nothing, if the disk cannot store it."""
        state = apply(self._state, indexed)
        self._write(lambda disk: disk.append(indexed))
        self._record(indexed, state)
        self._notify(indexed)
        self._elide_old_ephemeral(indexed.idx - EPHEMERAL_BODIES_KEPT)

    def _elide_old_ephemeral(self, idx: int) -> None:
        """Token chunks are only of use while their request streams: past the most recent
        EPHEMERAL_BODIES_KEPT events, keep their id and place in the log, not their text."""
        old = self.event_at(idx)
        if old is not None and old.event.ephemeral:
            self._events[idx - self._base] = elided(old)

    def _write(self, change: Callable[[DiskEventLog], None]) -> None:
        """Change the disk log; a failure is remembered in write_error and raised."""
        if self._disk is None:
            return
        try:
            change(self._disk)
        except LogWriteError as error:
            self._write_failed(error, "write")
            raise
        self._write_succeeded("write")

    def _write_failed(self, error: LogWriteError, source: Literal["write", "sync"]) -> None:
        if str(error) != self._write_error:
            logger.error(str(error))
        self._write_error = str(error)
        self._write_error_source = source

    def _write_succeeded(self, source: Literal["write", "sync"]) -> None:
        """A write or fsync worked: it ends a failure of its own kind (an append that works
        says nothing of a failing fsync, and the other way round)."""
        if self._write_error is not None and self._write_error_source == source:
            self._write_error = None
            logger.info("event log writable again")

    def _apply_in_memory(self, indexed: IndexedEvent) -> None:
        self._record(indexed, apply(self._state, indexed))

    def _record(self, indexed: IndexedEvent, state: State) -> None:
        if state.members != self._state.members:
            self._membership_idx = indexed.idx
        self._state = state
        self._events.append(indexed)
        self._applied_at.append(time.time())
        self._event_ids.add(indexed.event.event_id)

    def _notify(self, indexed: IndexedEvent) -> None:
        self._signal_change()
        alive: list[MemoryObjectSendStream[IndexedEvent]] = []
        for subscriber in self._subscribers:
            try:
                subscriber.send_nowait(indexed)
                alive.append(subscriber)
            except anyio.WouldBlock:
                logger.warning("an event subscriber fell behind and was dropped")
                subscriber.close()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                subscriber.close()
        self._subscribers = alive

    def truncate_after(self, last_kept_idx: int) -> None:
        """Forget every event after last_kept_idx and rebuild state (divergence repair).
        Raises LogWriteError, changing nothing, if the disk log cannot be cut."""
        if last_kept_idx >= self.last_idx:
            return
        if last_kept_idx < self._base - 1:
            raise ValueError(f"cannot cut into the snapshot (up to event {self._base - 1})")
        self._write(lambda disk: disk.truncate_after(last_kept_idx))
        logger.warning(
            f"dropping events {last_kept_idx + 1}..{self.last_idx}: they differ from the master's log"
        )
        kept = self._events[: last_kept_idx + 1 - self._base]
        self._reset_to_base()
        for indexed in kept:
            self._apply_in_memory(indexed)
        self._signal_change()

    def subscribe(self, buffer: int = 10_000) -> MemoryObjectReceiveStream[IndexedEvent]:
        """A stream of every event appended from now on."""
        send, receive = anyio.create_memory_object_stream[IndexedEvent](buffer)
        self._subscribers.append(send)
        return receive

    def _signal_change(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    @property
    def changed(self) -> anyio.Event:
        """Set (and replaced) on the next change of the log."""
        return self._changed

    async def wait_for_index(self, idx: int, timeout_s: float) -> bool:
        with anyio.move_on_after(timeout_s):
            while self.last_idx < idx:
                await self._changed.wait()
            return True
        return False

    @property
    def durable_idx(self) -> int:
        """The last index on stable storage (fsynced, or in the snapshot); every held index
        without a disk."""
        if self._disk is None:
            return self.last_idx
        return max(min(self._disk.durable_idx, self.last_idx), self._base - 1)

    def make_durable(self) -> int:
        """fsync the events not on stable storage yet (one fsync for all of them; nothing
        when there are none) and return :attr:`durable_idx`: ``last_idx``, or less when the
        fsync failed (logged once and kept in write_error, as for :meth:`sync`). Call it
        before counting or acknowledging events as stored."""
        self.sync()
        return self.durable_idx

    async def make_durable_in_thread(self) -> int:
        """:meth:`make_durable` with the fsync on a worker thread: the event loop goes on
        meanwhile (appends too; they count from the next sync). One at a time."""
        disk = self._disk
        if disk is None:
            return self.durable_idx
        async with self._fsync_in_thread:
            try:
                pending = disk.begin_sync()
                if pending is not None:
                    disk.finish_sync(pending, await anyio.to_thread.run_sync(pending.fsync))
            except LogWriteError as error:
                self._write_failed(error, "sync")
                return self.durable_idx
            self._write_succeeded("sync")
        return self.durable_idx

    def sync(self) -> None:
        """fsync the disk log. A failure is logged and kept in write_error, not raised: the
        events stay in memory and in the file, and the next sync writes them again."""
        if self._disk is None:
            return
        try:
            self._disk.sync()
        except LogWriteError as error:
            self._write_failed(error, "sync")
            return
        self._write_succeeded("sync")

    def close(self) -> None:
        for subscriber in self._subscribers:
            subscriber.close()
        if self._disk is not None:
            try:
                self._disk.close()
            except LogWriteError as error:
                logger.error(f"{error}; events since the last sync may not be on disk")
