"""The outbox: a new telemetry event supersedes what it covers of the pending ones."""

from datetime import UTC, datetime, timedelta
from typing import cast

import anyio
import pytest

from exo.routing.context import ClusterContext
from exo.routing.election import Election
from exo.routing.local_events import LocalEventSender, still_needed
from exo.routing.messages import LocalEventMessage
from exo.routing.router import Router
from exo.routing.topics import Topics
from exo.shared.event_store import EventStore
from exo.shared.types.events import (
    DeviceGPUStatesUpdated,
    DeviceGPUStateUpdated,
    Event,
    IndexedEvent,
    MasterElected,
    NodeMemoryUpdated,
)
from exo.shared.types.gpu import DeviceGPUState
from exo.shared.types.ids import DeviceId, NodeId

NODE = NodeId("node-a")
OTHER = NodeId("node-b")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
SIXTEEN = [f"cuda:{index}" for index in range(16)]


def reading(device: str, node_id: NodeId = NODE, seconds: float = 0) -> DeviceGPUState:
    return DeviceGPUState(
        device_id=DeviceId(device),
        node_id=node_id,
        memory_used_bytes=1,
        memory_total_bytes=8,
        compute_utilization_percent=0,
        last_update=T0 + timedelta(seconds=seconds),
    )


def single(device: str, node_id: NodeId = NODE) -> DeviceGPUStateUpdated:
    return DeviceGPUStateUpdated(device_state=reading(device, node_id))


def a_pass(
    full: list[str], unchanged: list[str], node_id: NodeId = NODE, seconds: float = 0
) -> DeviceGPUStatesUpdated:
    return DeviceGPUStatesUpdated(
        node_id=node_id,
        device_states=[reading(device, node_id, seconds) for device in full],
        unchanged_device_ids=[DeviceId(device) for device in unchanged],
        sampled_at=T0 + timedelta(seconds=seconds),
    )


def ids(event: Event | None) -> tuple[list[str], list[str]]:
    """(full, unchanged) device ids of a telemetry event."""
    if isinstance(event, DeviceGPUStateUpdated):
        return [event.device_state.device_id], []
    assert isinstance(event, DeviceGPUStatesUpdated)
    return [s.device_id for s in event.device_states], list(event.unchanged_device_ids)


# --- the pure rule ---


def test_other_events_and_other_nodes_are_never_superseded() -> None:
    memory = NodeMemoryUpdated(node_id=NODE, ram_available_bytes=1)
    assert still_needed(memory, a_pass(SIXTEEN, [])) is memory
    assert still_needed(a_pass([], ["cuda:0"]), memory) is not None
    theirs = a_pass(["cuda:0"], ["cuda:1"], node_id=OTHER)
    assert still_needed(theirs, a_pass(["cuda:0", "cuda:1"], [])) is theirs
    their_single = single("cuda:0", OTHER)
    assert still_needed(their_single, single("cuda:0")) is their_single


def test_a_newer_reading_covers_an_older_one() -> None:
    assert still_needed(single("cuda:0"), single("cuda:0")) is None
    assert still_needed(single("cuda:0"), a_pass(["cuda:0"], ["cuda:1"])) is None
    older = single("cuda:1")
    assert still_needed(older, single("cuda:0")) is older


def test_a_heartbeat_covers_heartbeats_but_not_readings() -> None:
    heartbeat = a_pass([], SIXTEEN)
    assert still_needed(heartbeat, a_pass([], SIXTEEN, seconds=10)) is None
    assert still_needed(heartbeat, a_pass(SIXTEEN, [], seconds=10)) is None
    # "Unchanged since my last emitted reading": that reading is the pending one, so the
    # heartbeat must not stand in for it.
    changed = single("cuda:0")
    assert still_needed(changed, a_pass([], SIXTEEN, seconds=10)) is changed
    first_pass = a_pass(SIXTEEN, [])
    assert still_needed(first_pass, a_pass([], SIXTEEN, seconds=10)) is first_pass


def test_a_partly_covered_pass_keeps_the_rest_under_its_id() -> None:
    pending = a_pass(["cuda:0", "cuda:1"], ["cuda:2", "cuda:3"])
    rest = still_needed(pending, a_pass(["cuda:0"], ["cuda:1", "cuda:2"], seconds=2))
    assert rest is not None and rest.event_id == pending.event_id
    assert ids(rest) == (["cuda:1"], ["cuda:3"])
    assert isinstance(rest, DeviceGPUStatesUpdated) and rest.sampled_at == pending.sampled_at


# --- the outbox ---


class FakeRouter:
    def __init__(self) -> None:
        self.sent: list[Event] = []

    def publish(self, key_expr: str, payload: bytes) -> None:
        assert key_expr == "test/local_events"
        self.sent.append(LocalEventMessage.model_validate_json(payload).event)


def outbox() -> tuple[LocalEventSender, FakeRouter, EventStore]:
    router = FakeRouter()
    store = EventStore(None)
    context = ClusterContext(
        NODE, cast(Router, router), Topics("test"), cast(Election, object()), store
    )
    return LocalEventSender(context), router, store


@pytest.mark.anyio
async def test_a_masterless_period_leaves_a_bounded_outbox() -> None:
    sender, router, store = outbox()
    memory = NodeMemoryUpdated(node_id=NODE, ram_available_bytes=1)
    sender.emit_nowait(memory)
    sender.emit_nowait(a_pass(SIXTEEN, []))
    for beat in range(1, 100):  # about 16 minutes of idle heartbeats, none acknowledged
        sender.emit_nowait(a_pass([], SIXTEEN, seconds=10 * beat))
    # The memory report, the first readings (no heartbeat stands in for them), the last
    # heartbeat.
    assert sender.pending_count == 3
    sender.emit_nowait(single("cuda:5"))
    sender.emit_nowait(single("cuda:5"))
    assert sender.pending_count == 4  # the older cuda:5 reading is covered by the newer
    sender.emit_nowait(a_pass(SIXTEEN, [], seconds=2000))
    assert sender.pending_count == 2  # the memory report and the newest pass

    # A master takes over: what is still pending goes again, and only that.
    assert len(router.sent) == 104
    async with anyio.create_task_group() as group:
        group.start_soon(sender.run)
        await anyio.sleep(0.01)
        store.append(IndexedEvent(idx=0, event=MasterElected(master_node_id=OTHER)))
        with anyio.fail_after(2):
            while len(router.sent) < 106:
                await anyio.sleep(0.005)
        group.cancel_scope.cancel()
    resent = router.sent[104:]
    assert resent[0] == memory.model_copy(update={"origin_node_id": NODE})
    assert ids(resent[1]) == (SIXTEEN, [])
    assert isinstance(resent[1], DeviceGPUStatesUpdated)
    assert resent[1].sampled_at == T0 + timedelta(seconds=2000)
