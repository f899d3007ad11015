"""A worker's outbox: local events go to the master until they are seen in the global log.

Nothing a worker emitted is lost across a master change: an event not yet seen in the
global log is sent again, at once when the new master's ``MasterElected`` arrives in the log
(a master indexes nothing before it), and after a short timeout otherwise; the master
ignores duplicates by event id.

A new telemetry event supersedes what it covers of the pending ones (``still_needed``), so
a long masterless period leaves a bounded outbox rather than a pile of readings to resend.
"""

import time

import anyio
from loguru import logger

from exo.routing.context import ClusterContext
from exo.routing.messages import LocalEventMessage
from exo.shared.types.events import (
    DeviceGPUStatesUpdated,
    DeviceGPUStateUpdated,
    Event,
    MasterElected,
)
from exo.shared.types.ids import DeviceId, EventId, NodeId

RESEND_AFTER_S = 1.0


def _telemetry_parts(
    event: Event,
) -> tuple[NodeId, frozenset[DeviceId], frozenset[DeviceId]] | None:
    """(node, devices read in full, devices heartbeating by id) of a telemetry event."""
    match event:
        case DeviceGPUStateUpdated():
            reading = event.device_state
            return reading.node_id, frozenset({reading.device_id}), frozenset()
        case DeviceGPUStatesUpdated():
            full = frozenset(reading.device_id for reading in event.device_states)
            return event.node_id, full, frozenset(event.unchanged_device_ids) - full
        case _:
            return None


def still_needed(pending: Event, newer: Event) -> Event | None:
    """What of ``pending`` must still reach the log once ``newer`` (a later event of the same
    node) is sent: ``pending`` itself, a copy with the covered devices left out (same event
    id, so if the master already has the original it ignores the copy), or None when
    ``newer`` covers all of it.

    A device's full reading is covered only by a newer full reading of it; a heartbeat (an
    unchanged id) by either. A heartbeat does not cover a full reading: it says "unchanged
    since my last emitted reading", which is the pending one; without it the heartbeat would
    refresh an older reading in the state. Each device is thus pending in at most one full
    reading and one heartbeat, whatever the outage's length.
    """
    old, new = _telemetry_parts(pending), _telemetry_parts(newer)
    if old is None or new is None or old[0] != new[0]:
        return pending
    _, old_full, old_unchanged = old
    _, new_full, new_unchanged = new
    full_left = old_full - new_full
    unchanged_left = old_unchanged - new_full - new_unchanged
    if not full_left and not unchanged_left:
        return None
    if not isinstance(pending, DeviceGPUStatesUpdated) or (
        full_left == old_full and unchanged_left == old_unchanged
    ):
        return pending  # nothing covered (a single reading is covered whole or not at all)
    return pending.model_copy(
        update={
            "device_states": [s for s in pending.device_states if s.device_id in full_left],
            "unchanged_device_ids": [
                d for d in pending.unchanged_device_ids if d in unchanged_left
            ],
        }
    )


class LocalEventSender:
    def __init__(self, context: ClusterContext) -> None:
        self._router = context.router
        self._topics = context.topics
        self._store = context.store
        self._node_id = context.node_id
        self._pending: dict[EventId, tuple[Event, float]] = {}

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    async def emit(self, event: Event) -> None:
        """Send an event to the master; it will be resent until seen in the global log."""
        self.emit_nowait(event)

    def emit_nowait(self, event: Event) -> None:
        if event.origin_node_id is None:
            event = event.model_copy(update={"origin_node_id": self._node_id})
        if _telemetry_parts(event) is not None:
            self._supersede(event)
        self._pending[event.event_id] = (event, time.monotonic())
        self._send(event)

    def _supersede(self, newer: Event) -> None:
        for event_id, (pending, sent_at) in list(self._pending.items()):
            remainder = still_needed(pending, newer)
            if remainder is None:
                del self._pending[event_id]
            elif remainder is not pending:
                self._pending[event_id] = (remainder, sent_at)

    def _send(self, event: Event) -> None:
        message = LocalEventMessage(origin_node_id=self._node_id, event=event)
        self._router.publish(self._topics.local_events, message.model_dump_json().encode())

    def _resend_all(self) -> None:
        if self._pending:
            logger.info(f"resending {len(self._pending)} events not yet in the global log")
        for event, _ in self._pending.values():
            self._send(event)

    async def run(self) -> None:
        events = self._store.subscribe()
        async with anyio.create_task_group() as group:
            group.start_soon(self._resend_loop)
            async with events:
                async for indexed in events:
                    self._pending.pop(indexed.event.event_id, None)
                    if isinstance(indexed.event, MasterElected):
                        # The new master indexes from now on; what it ignored before it
                        # took over goes again at once rather than after the timeout.
                        self._resend_all()
            group.cancel_scope.cancel()

    async def _resend_loop(self) -> None:
        while True:
            await anyio.sleep(RESEND_AFTER_S / 2)
            now = time.monotonic()
            for event_id, (event, sent_at) in list(self._pending.items()):
                if self._store.contains_event(event_id):
                    del self._pending[event_id]
                elif now - sent_at >= RESEND_AFTER_S:
                    self._pending[event_id] = (event, now)
                    self._send(event)
