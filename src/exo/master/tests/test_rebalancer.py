"""The master's ``Rebalancer`` stepping instances on a real event store: what it writes to
the log, when, and when it writes nothing."""

import errno
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from loguru import logger

from exo.master.replacement import Rebalancer, ReplacementConfig, describe_layout
from exo.master.tests.placement_helpers import gpu_info, gpu_state
from exo.master.tests.test_replacement import (
    cluster,
    placed,
    the_instance,
    with_second_shard_throttling,
)
from exo.shared.event_log import LogWriteError
from exo.shared.event_store import EventStore
from exo.shared.snapshot import Snapshot
from exo.shared.types.events import (
    DeviceGPUStateUpdated,
    Event,
    GPUDeviceInfoReported,
    IndexedEvent,
    InstanceDeleted,
    InstanceFailed,
    InstanceReplaced,
    InstanceReplacementAborted,
    InstanceReplacementStarted,
    NodeInfoReported,
    NodeTimedOut,
    RunnerStatusUpdated,
)
from exo.shared.types.ids import InstanceId, NodeId
from exo.shared.types.instances import Instance, PlacementChange, Shard
from exo.shared.types.memory import GIB
from exo.shared.types.node import NodeStaticInfo
from exo.shared.types.runners import RunnerStatus
from exo.shared.types.state import State

TERM = 1


class Master:
    """A master's side of the rebalancer: a store on disk that starts from the cluster's
    state, and the index it writes decided events through."""

    def __init__(self, directory: Path, state: State) -> None:
        self.store = EventStore(directory)
        self.store.load()
        snapshot_state = state.model_copy(update={"last_event_applied_idx": 0})
        self.store.install_snapshot(Snapshot(idx=0, term=TERM, state=snapshot_state))
        self.active = True
        self.disk_full = False

    def index(self, event: Event) -> int:
        if self.disk_full:
            raise LogWriteError(Path("events.log"), OSError(errno.ENOSPC, "No space left"))
        indexed = IndexedEvent(idx=self.store.last_idx + 1, term=TERM, event=event)
        self.store.append(indexed)
        return indexed.idx

    def rebalancer(self, config: ReplacementConfig) -> Rebalancer:
        return Rebalancer(self.store, self.index, lambda: self.active, config)

    def written_since(self, idx: int) -> list[Event]:
        return [
            indexed.event for indexed in self.store.events_between(idx + 1, self.store.last_idx)
        ]

    @property
    def instance(self) -> Instance:
        return the_instance(self.store.state)


def instance_id(master: Master) -> InstanceId:
    return master.instance.instance_id


def runners_report(master: Master, shards: list[Shard], status: RunnerStatus) -> None:
    for shard in shards:
        master.index(
            RunnerStatusUpdated(
                runner_id=shard.runner_id,
                instance_id=instance_id(master),
                node_id=shard.node_id,
                status=status,
            )
        )


def node_joins(master: Master, node: str) -> None:
    master.index(
        NodeInfoReported(
            node_id=NodeId(node),
            info=NodeStaticInfo(
                friendly_name=node, hostname=node, os="linux", cpu_count=8, ram_total_bytes=16 * GIB
            ),
            ram_available_bytes=12 * GIB,
        )
    )
    master.index(GPUDeviceInfoReported(device_info=gpu_info(node)))
    master.index(DeviceGPUStateUpdated(device_state=gpu_state(node)))


def throttling(master: Master, node: NodeId, hot: bool) -> None:
    master.index(DeviceGPUStateUpdated(device_state=gpu_state(node, throttling=hot)))


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """What loguru logs during the test, as "LEVEL message"."""
    lines: list[str] = []
    handler = logger.add(
        lambda message: lines.append(f"{message.record['level'].name} {message.record['message']}"),
        level="INFO",
    )
    yield lines
    logger.remove(handler)


def throttled_master(tmp_path: Path) -> tuple[Master, NodeId]:
    """A three-node cluster serving on two nodes, the device of its second shard throttling
    (a fresh placement is well past the margin), and that shard's node."""
    calm = placed(cluster(["n0", "n1", "n2"]))
    hot = the_instance(calm).shards[1].node_id
    return Master(tmp_path, with_second_shard_throttling(calm)), hot


SUSTAIN = ReplacementConfig(move_sustain_s=0.4)


@pytest.mark.anyio
async def test_a_sustained_gain_moves_only_after_the_sustain_time(
    tmp_path: Path, log_lines: list[str]
) -> None:
    master, hot = throttled_master(tmp_path)
    rebalancer = master.rebalancer(SUSTAIN)
    first = master.store.last_idx
    await rebalancer._step(instance_id(master))  # pyright: ignore[reportPrivateUsage]
    assert master.written_since(first) == []  # the gain is seen, not yet sustained
    await anyio.sleep(SUSTAIN.move_sustain_s / 2)
    await rebalancer._step(instance_id(master))  # pyright: ignore[reportPrivateUsage]
    assert master.written_since(first) == []
    await anyio.sleep(SUSTAIN.move_sustain_s / 2 + 0.1)
    old = master.instance
    await rebalancer._step(instance_id(master))  # pyright: ignore[reportPrivateUsage]
    [started] = master.written_since(first)
    assert isinstance(started, InstanceReplacementStarted)
    change = started.replacement.change
    assert change.kind == "move" and change.old_shards == old.shards
    assert hot not in {shard.node_id for shard in started.replacement.shards}
    gain = change.predicted_gain
    assert gain is not None and gain >= SUSTAIN.move_margin
    assert change.old_predicted_ms is not None
    # The reason names the gain, both predictions, the objective, how long the gain held
    # (about the sustain time: whole seconds) and the new layout.
    held = re.fullmatch(
        re.escape(
            f"a fresh placement is predicted {gain:.0%} faster ({change.new_predicted_ms:.2f} "
            f"against {change.old_predicted_ms:.2f} ms in its {old.placement.objective} "
            "objective) for "
        )
        + r"(\d+)"
        + re.escape(f" s: {describe_layout(started.replacement.shards)}"),
        change.reason,
    )
    assert held is not None and int(held.group(1)) in (0, 1)
    assert master.instance.incoming is not None  # applied: the new set loads
    started_lines = [line for line in log_lines if line.startswith("INFO move of instance")]
    assert started_lines == [
        f"INFO move of instance {old.instance_id} ({old.model_id}) started: {change.reason}, "
        f"predicted gain {gain:.0%}; loading [{describe_layout(started.replacement.shards)}]"
    ]
    # One change at a time: while the new set loads nothing more is written.
    loading = master.store.last_idx
    await rebalancer._step(instance_id(master))  # pyright: ignore[reportPrivateUsage]
    assert master.written_since(loading) == []


@pytest.mark.anyio
async def test_a_gain_that_goes_away_starts_the_sustain_time_again(tmp_path: Path) -> None:
    master, hot = throttled_master(tmp_path)
    rebalancer = master.rebalancer(SUSTAIN)
    first = master.store.last_idx
    await rebalancer._step(instance_id(master))  # pyright: ignore[reportPrivateUsage]
    throttling(master, hot, hot=False)
    await rebalancer._step(instance_id(master))  # pyright: ignore[reportPrivateUsage]
    throttling(master, hot, hot=True)
    await anyio.sleep(SUSTAIN.move_sustain_s + 0.1)  # long after the gain was first seen
    calm_again = master.store.last_idx
    await rebalancer._step(instance_id(master))  # pyright: ignore[reportPrivateUsage]
    assert master.written_since(calm_again) == []  # it is counted from its return
    await anyio.sleep(SUSTAIN.move_sustain_s + 0.1)
    await rebalancer._step(instance_id(master))  # pyright: ignore[reportPrivateUsage]
    moves = [event for event in master.written_since(first) if not is_reading(event)]
    assert len(moves) == 1 and isinstance(moves[0], InstanceReplacementStarted)
    assert moves[0].replacement.change.kind == "move"


def is_reading(event: Event) -> bool:
    return isinstance(event, DeviceGPUStateUpdated)


@pytest.mark.anyio
async def test_a_break_starts_a_pending_moves_sustain_time_again(tmp_path: Path) -> None:
    """A serving set that broke in between (here while this master could not write) is not
    the steady layout the gain was measured against."""
    master, _ = throttled_master(tmp_path)
    rebalancer = master.rebalancer(SUSTAIN)
    await rebalancer._step(instance_id(master))  # pyright: ignore[reportPrivateUsage]
    await anyio.sleep(SUSTAIN.move_sustain_s + 0.1)
    master.active = False
    first_shard = master.instance.shards[:1]
    runners_report(master, first_shard, "failed")
    await rebalancer._step(instance_id(master))  # pyright: ignore[reportPrivateUsage]
    runners_report(master, first_shard, "ready")
    master.active = True
    serving_again = master.store.last_idx
    await rebalancer._step(instance_id(master))  # pyright: ignore[reportPrivateUsage]
    assert master.written_since(serving_again) == []
    await anyio.sleep(SUSTAIN.move_sustain_s + 0.1)
    await rebalancer._step(instance_id(master))  # pyright: ignore[reportPrivateUsage]
    [started] = master.written_since(serving_again)
    assert isinstance(started, InstanceReplacementStarted)


@pytest.mark.anyio
async def test_no_sustain_time_moves_at_the_first_step(tmp_path: Path) -> None:
    master, _ = throttled_master(tmp_path)
    first = master.store.last_idx
    await master.rebalancer(ReplacementConfig(move_sustain_s=0))._step(instance_id(master))  # pyright: ignore[reportPrivateUsage]
    [started] = master.written_since(first)
    assert isinstance(started, InstanceReplacementStarted)
    assert started.replacement.change.kind == "move"
    assert " for 0 s: " in started.replacement.change.reason


@pytest.mark.anyio
async def test_a_calm_cluster_writes_nothing(tmp_path: Path) -> None:
    master = Master(tmp_path, placed(cluster(["n0", "n1", "n2"])))
    rebalancer = master.rebalancer(ReplacementConfig(move_sustain_s=0))
    first = master.store.last_idx
    await rebalancer._step(instance_id(master))  # pyright: ignore[reportPrivateUsage]
    await rebalancer._step(InstanceId("not-an-instance"))  # pyright: ignore[reportPrivateUsage]
    assert master.written_since(first) == []


@pytest.mark.anyio
async def test_a_lost_node_heals_and_the_new_set_switches_in(
    tmp_path: Path, log_lines: list[str]
) -> None:
    master = Master(tmp_path, placed(cluster(["n0", "n1", "n2"])))
    rebalancer = master.rebalancer(ReplacementConfig())
    old = master.instance
    lost = old.shards[1].node_id
    master.index(NodeTimedOut(node_id=lost))
    first = master.store.last_idx
    before = datetime.now(UTC)
    await rebalancer._step(old.instance_id)  # pyright: ignore[reportPrivateUsage]
    after = datetime.now(UTC)
    [started] = master.written_since(first)
    assert isinstance(started, InstanceReplacementStarted)
    change = started.replacement.change
    assert before <= change.started_at <= after
    assert change.kind == "heal" and change.reason == f"node {lost} (rank 1) left the cluster"
    assert lost not in {shard.node_id for shard in started.replacement.shards}
    name = f"instance {old.instance_id} ({old.model_id})"
    layout = describe_layout(started.replacement.shards)
    assert f"INFO heal of {name} started: {change.reason}; loading [{layout}]" in log_lines
    # Loading: the serving set is still broken, but a change is in progress.
    loading = master.store.last_idx
    await rebalancer._step(old.instance_id)  # pyright: ignore[reportPrivateUsage]
    assert master.written_since(loading) == []
    runners_report(master, started.replacement.shards, "ready")
    ready = master.store.last_idx
    await rebalancer._step(old.instance_id)  # pyright: ignore[reportPrivateUsage]
    [switched] = master.written_since(ready)
    assert isinstance(switched, InstanceReplaced)
    assert switched.change_id == change.change_id
    assert master.instance.shards == started.replacement.shards
    assert f"INFO {name} switched to its new runners" in log_lines


@pytest.mark.anyio
async def test_a_new_set_that_fails_is_aborted_with_a_warning(
    tmp_path: Path, log_lines: list[str]
) -> None:
    master = Master(tmp_path, placed(cluster(["n0", "n1", "n2"])))
    rebalancer = master.rebalancer(ReplacementConfig())
    master.index(NodeTimedOut(node_id=master.instance.shards[1].node_id))
    await rebalancer._step(instance_id(master))  # pyright: ignore[reportPrivateUsage]
    incoming = master.instance.shards_of("incoming")
    runners_report(master, incoming[:1], "failed")
    failed = master.store.last_idx
    await rebalancer._step(instance_id(master))  # pyright: ignore[reportPrivateUsage]
    [aborted] = master.written_since(failed)
    assert isinstance(aborted, InstanceReplacementAborted)
    assert aborted.failed_devices == [(incoming[0].node_id, incoming[0].device_id)]
    name = f"instance {master.instance.instance_id} ({master.instance.model_id})"
    assert f"WARNING change of {name} aborted: {aborted.reason}" in log_lines


@pytest.mark.anyio
async def test_a_failed_instance_is_tried_again_only_after_the_retry_time(
    tmp_path: Path, log_lines: list[str]
) -> None:
    master = Master(tmp_path, placed(cluster(["n0", "n1"])))
    config = ReplacementConfig(heal_retry_s=0.5)
    rebalancer = master.rebalancer(config)
    master.index(NodeTimedOut(node_id=NodeId("n1")))
    first = master.store.last_idx
    await rebalancer._step(instance_id(master))  # pyright: ignore[reportPrivateUsage]
    [failed] = master.written_since(first)
    assert isinstance(failed, InstanceFailed)
    assert "cannot be placed again" in failed.reason
    assert master.instance.failure == failed.reason
    name = f"instance {master.instance.instance_id} ({master.instance.model_id})"
    assert f"ERROR {name} failed: {failed.reason}" in log_lines
    node_joins(master, "n2")  # it would fit again now
    joined = master.store.last_idx
    await rebalancer._step(instance_id(master))  # pyright: ignore[reportPrivateUsage]
    assert master.written_since(joined) == []  # not tried again so soon
    await anyio.sleep(config.heal_retry_s + 0.1)
    await rebalancer._step(instance_id(master))  # pyright: ignore[reportPrivateUsage]
    [started] = master.written_since(joined)
    assert isinstance(started, InstanceReplacementStarted)
    assert started.replacement.change.kind == "heal"
    assert {shard.node_id for shard in started.replacement.shards} == {"n0", "n2"}


@pytest.mark.anyio
async def test_a_new_master_tries_an_instance_that_failed_before_at_once(tmp_path: Path) -> None:
    before = Master(tmp_path / "old", placed(cluster(["n0", "n1"])))
    before.index(NodeTimedOut(node_id=NodeId("n1")))
    await before.rebalancer(ReplacementConfig())._step(instance_id(before))  # pyright: ignore[reportPrivateUsage]
    assert before.instance.failure is not None
    node_joins(before, "n2")
    master = Master(tmp_path / "new", before.store.state)
    first = master.store.last_idx
    await master.rebalancer(ReplacementConfig())._step(instance_id(master))  # pyright: ignore[reportPrivateUsage]
    [started] = master.written_since(first)
    assert isinstance(started, InstanceReplacementStarted)


@pytest.mark.anyio
async def test_an_inactive_rebalancer_writes_nothing(tmp_path: Path) -> None:
    master = Master(tmp_path, placed(cluster(["n0", "n1", "n2"])))
    rebalancer = master.rebalancer(ReplacementConfig())
    master.index(NodeTimedOut(node_id=master.instance.shards[1].node_id))
    master.active = False
    first = master.store.last_idx
    await rebalancer._step(instance_id(master))  # pyright: ignore[reportPrivateUsage]
    assert master.written_since(first) == []
    assert master.instance.incoming is None


@pytest.mark.anyio
async def test_nothing_is_written_for_an_instance_that_changed_while_deciding(
    tmp_path: Path,
) -> None:
    master = Master(tmp_path, placed(cluster(["n0", "n1", "n2"])))
    rebalancer = master.rebalancer(ReplacementConfig())
    master.index(NodeTimedOut(node_id=master.instance.shards[1].node_id))
    instance = instance_id(master)
    async with anyio.create_task_group() as group:
        group.start_soon(rebalancer._step, instance)  # pyright: ignore[reportPrivateUsage]
        await anyio.sleep(0)  # the step has read the state and is deciding in a thread
        master.index(InstanceDeleted(instance_id=instance))
    assert not [e for e in master.written_since(0) if isinstance(e, InstanceReplacementStarted)]


@pytest.mark.anyio
async def test_a_full_disk_is_left_for_the_next_round(tmp_path: Path, log_lines: list[str]) -> None:
    master = Master(tmp_path, placed(cluster(["n0", "n1", "n2"])))
    rebalancer = master.rebalancer(ReplacementConfig())
    master.index(NodeTimedOut(node_id=master.instance.shards[1].node_id))
    first = master.store.last_idx
    master.disk_full = True
    await rebalancer._step(instance_id(master))  # pyright: ignore[reportPrivateUsage]
    assert master.written_since(first) == []
    assert not [line for line in log_lines if " started: " in line]  # nothing claimed
    master.disk_full = False
    await rebalancer._step(instance_id(master))  # pyright: ignore[reportPrivateUsage]
    [started] = master.written_since(first)
    assert isinstance(started, InstanceReplacementStarted)


def with_history(master: Master, finished_s_ago: float) -> None:
    """The instance had a heal that finished ``finished_s_ago`` seconds ago."""
    finished = datetime.now(UTC) - timedelta(seconds=finished_s_ago)
    state = master.store.state
    instance = the_instance(state)
    change = PlacementChange(
        change_id="earlier",
        kind="heal",
        reason="an earlier heal",
        old_shards=instance.shards,
        new_shards=instance.shards,
        old_predicted_ms=None,
        new_predicted_ms=1.0,
        predicted_gain=None,
        started_at=finished - timedelta(seconds=5),
        finished_at=finished,
        outcome="switched",
    )
    instances = {instance.instance_id: instance.model_copy(update={"changes": [change]})}
    state = state.model_copy(
        update={"instances": instances, "last_event_applied_idx": master.store.last_idx + 1}
    )
    master.store.install_snapshot(Snapshot(idx=master.store.last_idx + 1, term=TERM, state=state))


@pytest.mark.anyio
async def test_a_move_waits_for_the_last_change_to_settle(tmp_path: Path) -> None:
    config = ReplacementConfig(move_sustain_s=0)
    for finished_s_ago, moves in ((config.settle_s / 2, False), (config.settle_s * 10, True)):
        master, _ = throttled_master(tmp_path / str(finished_s_ago))
        with_history(master, finished_s_ago)
        first = master.store.last_idx
        await master.rebalancer(config)._step(instance_id(master))  # pyright: ignore[reportPrivateUsage]
        written = master.written_since(first)
        assert [type(event) for event in written] == ([InstanceReplacementStarted] if moves else [])


async def written_within(master: Master, first: int, seconds: float) -> list[Event]:
    """The decided events (not the test's own) written after ``first`` within ``seconds``."""
    decided = (InstanceReplacementStarted, InstanceFailed, InstanceReplaced)
    with anyio.move_on_after(seconds):
        while not [e for e in master.written_since(first) if isinstance(e, decided)]:
            await anyio.sleep(0.02)
    return [e for e in master.written_since(first) if isinstance(e, decided)]


@pytest.mark.anyio
async def test_the_loop_heals_soon_after_the_change_not_at_its_next_interval(
    tmp_path: Path,
) -> None:
    master = Master(tmp_path, placed(cluster(["n0", "n1", "n2"])))
    rebalancer = master.rebalancer(ReplacementConfig(check_interval_s=30))
    written: list[Event] = []
    async with anyio.create_task_group() as group:
        group.start_soon(rebalancer.run)
        await anyio.sleep(0.5)  # it has looked once: nothing to do
        first = master.store.last_idx
        assert master.written_since(first) == []
        master.index(NodeTimedOut(node_id=master.instance.shards[1].node_id))
        written = await written_within(master, first, 3.0)
        group.cancel_scope.cancel()
    assert [type(event) for event in written] == [InstanceReplacementStarted]


@pytest.mark.anyio
async def test_the_loop_decides_nothing_while_this_node_is_not_the_master(
    tmp_path: Path,
) -> None:
    master = Master(tmp_path, placed(cluster(["n0", "n1", "n2"])))
    master.active = False
    rebalancer = master.rebalancer(ReplacementConfig(check_interval_s=0.1))
    first = master.store.last_idx
    written: list[Event] = []
    async with anyio.create_task_group() as group:
        group.start_soon(rebalancer.run)
        master.index(NodeTimedOut(node_id=master.instance.shards[1].node_id))
        assert await written_within(master, first, 1.0) == []
        master.active = True  # elected: it takes over
        written = await written_within(master, first, 3.0)
        group.cancel_scope.cancel()
    assert [type(event) for event in written] == [InstanceReplacementStarted]


@pytest.mark.anyio
async def test_a_condition_that_went_and_came_back_unseen_restarts_a_pending_move(
    tmp_path: Path, log_lines: list[str]
) -> None:
    """The hot device's throttling went and came back between two decisions (the worker
    sends only its newest reading, counting the changes): the gain was not steady."""
    master, hot = throttled_master(tmp_path)
    config = ReplacementConfig(check_interval_s=0.1, move_sustain_s=60)
    rebalancer = master.rebalancer(config)
    restarted = "a pending move's sustain time starts again"
    async with anyio.create_task_group() as group:
        group.start_soon(rebalancer.run)
        await anyio.sleep(1.0)  # the gain is seen: a move is pending
        assert not [line for line in log_lines if restarted in line]
        reading = gpu_state(hot, throttling=True).model_copy(update={"condition_changes": 2})
        master.index(DeviceGPUStateUpdated(device_state=reading))
        with anyio.move_on_after(3.0):
            while not [line for line in log_lines if restarted in line]:
                await anyio.sleep(0.02)
        group.cancel_scope.cancel()
    assert [line for line in log_lines if restarted in line] == [
        "INFO a device's throttling or power went and came back since the last decision: "
        "a pending move's sustain time starts again"
    ]
