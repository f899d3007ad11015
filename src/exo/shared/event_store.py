"""A node's copy of the global log and the state derived from it, kept on disk.

Single-threaded by design: it is only touched from the event loop thread.
"""

import time
from pathlib import Path

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from loguru import logger

from exo.shared.apply import apply
from exo.shared.event_log import DiskEventLog
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

    def load(self) -> None:
        """Open the disk log and rebuild state from it."""
        if self._disk is None:
            return
        for indexed in self._disk.open():
            self._apply_in_memory(indexed)
        if self._events:
            logger.info(f"reloaded {len(self._events)} events from {self._disk.path}")

    @property
    def state(self) -> State:
        return self._state

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
        """Apply and persist the next event. Raises EventOutOfOrderError if it isn't next."""
        self._apply_in_memory(indexed)
        if self._disk is not None:
            self._disk.append(indexed)
        self._notify(indexed)
        self._elide_old_ephemeral(indexed.idx - EPHEMERAL_BODIES_KEPT)

    def _elide_old_ephemeral(self, idx: int) -> None:
        """Token chunks are only of use while their request streams: past the most recent
        EPHEMERAL_BODIES_KEPT events, keep their id and place in the log, not their text."""
        old = self.event_at(idx)
        if old is not None and old.event.ephemeral:
            self._events[idx] = elided(old)

    def _apply_in_memory(self, indexed: IndexedEvent) -> None:
        self._state = apply(self._state, indexed)
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
        """Forget every event after last_kept_idx and rebuild state (divergence repair)."""
        if last_kept_idx >= self.last_idx:
            return
        logger.warning(
            f"dropping events {last_kept_idx + 1}..{self.last_idx}: they differ from the master's log"
        )
        kept = self._events[: last_kept_idx + 1]
        self._events, self._applied_at, self._event_ids = [], [], set()
        self._state = State()
        for indexed in kept:
            self._apply_in_memory(indexed)
        if self._disk is not None:
            self._disk.truncate_after(last_kept_idx)
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
        if self._disk is not None:
            self._disk.sync()

    def close(self) -> None:
        for subscriber in self._subscribers:
            subscriber.close()
        if self._disk is not None:
            self._disk.close()
