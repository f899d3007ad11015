"""Watching the node's event loop: a stall is measured, logged once with every thread's
stack, and told to those whose view it makes stale.

A task on the loop ticks every :data:`TICK_S`; how late each tick wakes is how long the
loop did not run (a long computation on it, a blocking call, the process frozen with
SIGSTOP). A thread of its own, which never waits on the loop, notices a loop that has not
ticked for :data:`REPORT_AFTER_S` and logs it once per stall with the stacks of all
threads (``faulthandler``), so the log shows where it is stuck while it is stuck.

Listeners (the election: a master that did not run cannot know it is still master) hear
of every stall longer than :data:`NOTIFY_AFTER_S`, on the loop, as soon as it runs again:
whichever code runs first after the stall, :meth:`LoopWatch.check` (called by readers of
time-sensitive state) or the tick, tells them before anything else reads that state.
"""

import faulthandler
import tempfile
import threading
import time
from collections.abc import Callable

import anyio
from loguru import logger

TICK_S = 0.25
REPORT_AFTER_S = 3.0
"""A loop that has not run for this long is logged, with every thread's stack."""
NOTIFY_AFTER_S = 1.0
"""A stall at least this long is told to the listeners."""
WATCH_INTERVAL_S = 0.5


class LoopWatch:
    def __init__(self) -> None:
        self._last_tick = time.monotonic()
        self._longest_stall_s = 0.0
        self._stall_count = 0
        self._listeners: list[Callable[[float], None]] = []
        self._reported_tick: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def longest_stall_s(self) -> float:
        """The longest the loop went without running since the node started."""
        return max(self._longest_stall_s, self.running_late_s())

    @property
    def stall_count(self) -> int:
        """Stalls of at least NOTIFY_AFTER_S so far."""
        return self._stall_count

    def running_late_s(self) -> float:
        """How long since the loop last ticked, beyond the tick interval."""
        return max(0.0, time.monotonic() - self._last_tick - TICK_S)

    def on_stall(self, listener: Callable[[float], None]) -> None:
        """listener(seconds) on the loop after every stall of at least NOTIFY_AFTER_S."""
        self._listeners.append(listener)

    def check(self) -> None:
        """On the loop: take note of a stall that has just ended (its listeners hear of it
        now, before the caller reads anything a stall makes stale)."""
        now = time.monotonic()
        stalled = now - self._last_tick - TICK_S
        self._last_tick = now
        self._longest_stall_s = max(self._longest_stall_s, stalled)
        if stalled >= NOTIFY_AFTER_S:
            self._stall_count += 1
            logger.warning(f"the event loop did not run for {stalled:.1f} s")
            for listener in self._listeners:
                listener(stalled)

    async def run(self) -> None:
        self._last_tick = time.monotonic()
        self._thread = threading.Thread(target=self._watch, name="loop-watch", daemon=True)
        self._thread.start()
        try:
            while True:
                await anyio.sleep(TICK_S)
                self.check()
        finally:
            self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL_S):
            last_tick = self._last_tick
            silent_s = time.monotonic() - last_tick
            if silent_s >= REPORT_AFTER_S and self._reported_tick != last_tick:
                self._reported_tick = last_tick
                logger.warning(
                    f"the event loop has not run for {silent_s:.1f} s; every thread's stack:\n"
                    + all_stacks()
                )


def all_stacks() -> str:
    """Every thread's Python stack, as faulthandler prints it."""
    with tempfile.TemporaryFile() as dump:
        faulthandler.dump_traceback(dump, all_threads=True)
        dump.seek(0)
        return dump.read().decode(errors="replace")
