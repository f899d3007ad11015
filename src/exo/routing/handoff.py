"""Hand-offs between zenoh's threads and the event loop, neither ever waiting on the other.

- :class:`Inbox`: a zenoh callback thread puts a message; the event loop delivers it. The
  thread only takes a short lock and, when the inbox was empty, schedules a drain with
  ``call_soon_threadsafe``; it never waits for the loop to run.
- :class:`Outbox`: the event loop puts a send; a thread of the outbox's own performs it (a
  zenoh ``put`` that may block on congestion, a query's reply). The loop only takes a short
  lock.

Both are bounded. A full queue either keeps only the newest message per key (``coalesce``:
heartbeats, liveliness, announcements, where only the latest value means anything) or
refuses the new message and counts it (everything else: each such topic has its own way of
getting the message again, see docs/architecture.md). A refusal is logged at the first one
and then at most every :data:`DROP_LOG_INTERVAL_S`.
"""

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from loguru import logger

DRAIN_BATCH = 64
"""Messages an inbox delivers per turn of the loop before it lets other tasks run."""
DROP_LOG_INTERVAL_S = 10.0

Message = TypeVar("Message")


class _Queue(Generic[Message]):
    """A bounded FIFO, or a map of the newest message per key; callers hold the lock."""

    def __init__(self, name: str, capacity: int, coalesce: bool) -> None:
        self.name = name
        self.capacity = capacity
        self.coalesce = coalesce
        self.lock = threading.Lock()
        self._fifo: deque[Message] = deque()
        self._newest: dict[str, Message] = {}
        self.dropped = 0
        self.coalesced = 0
        self._last_drop_log = 0.0

    def __len__(self) -> int:
        return len(self._newest) if self.coalesce else len(self._fifo)

    def push(self, key: str, message: Message) -> bool:
        """False when the queue refused the message (full)."""
        if self.coalesce:
            if key in self._newest:
                self.coalesced += 1
                self._newest[key] = message
                return True
            if len(self._newest) < self.capacity:
                self._newest[key] = message
                return True
        elif len(self._fifo) < self.capacity:
            self._fifo.append(message)
            return True
        self.dropped += 1
        now = time.monotonic()
        if self.dropped == 1 or now - self._last_drop_log >= DROP_LOG_INTERVAL_S:
            self._last_drop_log = now
            logger.warning(
                f"{self.name}: queue full ({self.capacity} waiting); refused a message "
                f"({self.dropped} so far)"
            )
        return False

    def pop(self) -> Message:
        if self.coalesce:
            key = next(iter(self._newest))
            return self._newest.pop(key)
        return self._fifo.popleft()


class Inbox(Generic[Message]):
    """zenoh thread -> event loop. ``deliver`` runs on the loop, one message at a time, in
    arrival order (per key, for a coalescing inbox)."""

    def __init__(
        self,
        name: str,
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[Message], None],
        capacity: int,
        coalesce: bool = False,
        refused: Callable[[Message], None] | None = None,
    ) -> None:
        """``refused`` runs on the putting thread for a message the full inbox refused (a
        query is finished there without a reply, say)."""
        self._queue: _Queue[Message] = _Queue(name, capacity, coalesce)
        self._loop = loop
        self._deliver = deliver
        self._refused = refused
        self._scheduled = False
        self.closed = False

    @property
    def name(self) -> str:
        return self._queue.name

    @property
    def dropped(self) -> int:
        return self._queue.dropped

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def put(self, key: str, message: Message) -> None:
        """From any thread; never waits for the loop."""
        queue = self._queue
        with queue.lock:
            accepted = not self.closed and queue.push(key, message)
            schedule = accepted and not self._scheduled
            if schedule:
                self._scheduled = True
        if not accepted:
            if self._refused is not None:
                self._refused(message)
            return
        if schedule:
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: the node is going down
                self.closed = True

    def _drain(self) -> None:
        queue = self._queue
        with queue.lock:
            batch = [queue.pop() for _ in range(min(DRAIN_BATCH, len(queue)))]
            more = len(queue) > 0
            self._scheduled = more
        for message in batch:
            try:
                self._deliver(message)
            except Exception as error:  # a component's bug must not stop the inbox
                logger.opt(exception=error).error(f"{self.name}: error handling a message")
        if more and not self.closed:
            self._loop.call_soon(self._drain)


Send = Callable[[], None]


class Outbox:
    """Event loop -> a sender thread that performs each send in order (per key, for a
    coalescing outbox). A send that raises is logged and the next one goes on."""

    def __init__(self, name: str, capacity: int, coalesce: bool = False) -> None:
        self._queue: _Queue[Send] = _Queue(name, capacity, coalesce)
        self._ready = threading.Condition(self._queue.lock)
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        return self._queue.dropped

    @property
    def coalesced(self) -> int:
        return self._queue.coalesced

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def put(self, key: str, send: Send) -> bool:
        """Never waits for the send; False when the full outbox refused it."""
        with self._ready:
            if self._closing or not self._queue.push(key, send):
                return False
            self._ready.notify()
            return True

    def _run(self) -> None:
        while True:
            with self._ready:
                while not len(self._queue) and not self._closing:
                    self._ready.wait()
                if not len(self._queue):
                    return
                send = self._queue.pop()
            try:
                send()
            except Exception as error:
                logger.warning(f"{self._queue.name}: a send failed ({error!r})")

    def close(self, timeout_s: float = 5.0) -> None:
        """Perform what is queued (for up to ``timeout_s``) and stop the thread. Blocking:
        call it from a worker thread."""
        with self._ready:
            self._closing = True
            self._ready.notify()
        self._thread.join(timeout_s)
