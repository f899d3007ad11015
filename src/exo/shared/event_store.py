"""A node's copy of the global log and the state derived from it, kept on disk.

Every change goes to disk first and to memory only once the disk took it: when the disk
cannot be written (full, failing) the store raises ``LogWriteError``, keeps its log and
state as they were, and remembers the failure in ``write_error`` until a write succeeds
again.

Single-threaded by design: it is only touched from the event loop thread.
"""

import time
from pathlib import Path
from typing import Literal

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from loguru import logger

from exo.shared.apply import apply
from exo.shared.event_log import DiskEventLog, LogWriteError
from exo.shared.types.events import IndexedEvent, elided
from exo.shared.types.ids import EventId
from exo.shared.types.state import State

EPHEMERAL_BODIES_KEPT = 10_000


class EventStore:
    def __init__(self, events_directory: Path | None) -> None:
        self._disk = DiskEventLog(events_directory) if events_directory is not None else None
        self._events: list[IndexedEvent] = []
        self._applied_at: list[float] = []
        self._event_ids: set[EventId] = set()
        self._state = State()
        self._changed = anyio.Event()
        self._subscribers: list[MemoryObjectSendStream[IndexedEvent]] = []
        self._write_error: str | None = None
        self._write_error_source: Literal["write", "sync"] = "write"

    def load(self, *, salvage: bool = False) -> None:
        """Open the disk log and rebuild state from it. Raises LogDamagedError when a record
        before the last is damaged; with salvage, keeps the intact records before it instead
        (the damaged file is set aside) and the node catches up on the rest from a peer."""
        if self._disk is None:
            return
        for indexed in self._disk.salvage() if salvage else self._disk.open():
            self._apply_in_memory(indexed)
        if self._events:
            logger.info(f"reloaded {len(self._events)} events from {self._disk.path}")

    @property
    def state(self) -> State:
        return self._state

    @property
    def write_error(self) -> str | None:
        """Why the last write to the disk log failed (one sentence), or None once writing
        works again."""
        return self._write_error

    @property
    def last_idx(self) -> int:
        return len(self._events) - 1

    def contains_event(self, event_id: EventId) -> bool:
        return event_id in self._event_ids

    def event_at(self, idx: int) -> IndexedEvent | None:
        return self._events[idx] if 0 <= idx < len(self._events) else None

    def events_between(self, first_idx: int, last_idx: int) -> list[IndexedEvent]:
        """Events with first_idx <= idx <= last_idx that this store holds."""
        first = max(first_idx, 0)
        return self._events[first : last_idx + 1]

    def applied_at(self, idx: int) -> float:
        return self._applied_at[idx]

    def append(self, indexed: IndexedEvent) -> None:
        """Persist and apply the next event. Raises EventOutOfOrderError if it isn't next,
        and LogWriteError, changing nothing, if the disk cannot store it."""
        state = apply(self._state, indexed)
        if self._disk is not None:
            try:
                self._disk.append(indexed)
            except LogWriteError as error:
                self._write_failed(error, "write")
                raise
            self._write_succeeded("write")
        self._record(indexed, state)
        self._notify(indexed)
        self._elide_old_ephemeral(indexed.idx - EPHEMERAL_BODIES_KEPT)

    def _elide_old_ephemeral(self, idx: int) -> None:
        """Token chunks are only of use while their request streams: past the most recent
        EPHEMERAL_BODIES_KEPT events, keep their id and place in the log, not their text."""
        old = self.event_at(idx)
        if old is not None and old.event.ephemeral:
            self._events[idx] = elided(old)

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
        self._state = state
        self._events.append(indexed)
        self._applied_at.append(time.time())
        self._event_ids.add(indexed.event.event_id)

    def _notify(self, indexed: IndexedEvent) -> None:
        self._changed.set()
        self._changed = anyio.Event()
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
        if self._disk is not None:
            try:
                self._disk.truncate_after(last_kept_idx)
            except LogWriteError as error:
                self._write_failed(error, "write")
                raise
            self._write_succeeded("write")
        logger.warning(
            f"dropping events {last_kept_idx + 1}..{self.last_idx}: they differ from the master's log"
        )
        kept = self._events[: last_kept_idx + 1]
        self._events, self._applied_at, self._event_ids = [], [], set()
        self._state = State()
        for indexed in kept:
            self._apply_in_memory(indexed)
        self._changed.set()
        self._changed = anyio.Event()

    def subscribe(self, buffer: int = 10_000) -> MemoryObjectReceiveStream[IndexedEvent]:
        """A stream of every event appended from now on."""
        send, receive = anyio.create_memory_object_stream[IndexedEvent](buffer)
        self._subscribers.append(send)
        return receive

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
