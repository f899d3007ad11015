"""Heal and move decisions on cluster states, applied through ``apply`` as nodes apply them."""

from datetime import datetime, timedelta

from exo.master.commands import handle_command
from exo.master.replacement import (
    ReplacementConfig,
    condition_flipped_unseen,
    heal,
    manual_replacement,
    move_candidate,
    progress_of_change,
)
from exo.master.tests.placement_helpers import NOW, gpu_info, gpu_state, node_info
from exo.shared.apply import apply_event
from exo.shared.types.calibration import DeviceCalibration
from exo.shared.types.commands import CommandResult, PlaceInstance
from exo.shared.types.events import (
    Event,
    InstanceCreated,
    InstanceFailed,
    InstanceReplaced,
    InstanceReplacementAborted,
    InstanceReplacementStarted,
    NodeTimedOut,
    RunnerStatusUpdated,
)
from exo.shared.types.ids import CommandId, NodeId, RunnerId, TaskId
from exo.shared.types.instances import (
    ChangeKind,
    Instance,
    PlacementChange,
    RebalancePolicy,
    Shard,
)
from exo.shared.types.runners import RunnerStatus
from exo.shared.types.state import State
from exo.shared.types.tasks import ChatCompletionParams, Task, TaskStatus

MODEL = "Llama-3.1-70B-Instruct-4bit"
"""A planning card: big enough that a throttled GPU's halved bandwidth shows."""
CONFIG = ReplacementConfig()


def cluster(nodes: list[str], throttling: frozenset[str] = frozenset()) -> State:
    return State(
        nodes={NodeId(node): node_info(node) for node in nodes},
        gpu_device_info={
            NodeId(node): {gpu_info(node).device_id: gpu_info(node)} for node in nodes
        },
        gpu_device_state={
            NodeId(node): {
                gpu_state(node).device_id: gpu_state(node, throttling=node in throttling)
            }
            for node in nodes
        },
    )


def applied(state: State, *events: Event) -> State:
    for event in events:
        state = apply_event(state, event)
    return state


def with_runners(state: State, shards: list[Shard], status: RunnerStatus) -> State:
    instance_id = next(iter(state.instances))
    return applied(
        state,
        *(
            RunnerStatusUpdated(
                runner_id=shard.runner_id,
                instance_id=instance_id,
                node_id=shard.node_id,
                status=status,
            )
            for shard in shards
        ),
    )


def placed(state: State, min_nodes: int = 2, rebalance: RebalancePolicy = "auto") -> State:
    events = handle_command(
        PlaceInstance(
            model_id=MODEL, min_nodes=min_nodes, rebalance=rebalance, allow_planning_only=True
        ),
        state,
    )
    assert isinstance(events, list) and isinstance(events[0], InstanceCreated)
    state = applied(state, *events)
    return with_runners(state, the_instance(state).shards, "ready")


def the_instance(state: State) -> Instance:
    return next(iter(state.instances.values()))


def with_second_shard_throttling(calm: State) -> State:
    """``calm`` (placed on the three-node cluster) with the device of its instance's second
    shard throttling."""
    hot_node = the_instance(calm).shards[1].node_id
    throttled = cluster(["n0", "n1", "n2"], throttling=frozenset({hot_node}))
    return throttled.model_copy(update={"instances": calm.instances, "runners": calm.runners})


def task(state: State, runner_id: RunnerId, task_id: str, status: TaskStatus) -> State:
    instance = the_instance(state)
    new = Task(
        task_id=TaskId(task_id),
        command_id=CommandId("c"),
        instance_id=instance.instance_id,
        requested_by=NodeId("n0"),
        params=ChatCompletionParams(model=MODEL),
        runner_id=runner_id,
        status=status,
    )
    return state.model_copy(update={"tasks": {**state.tasks, new.task_id: new}})


def test_a_lost_node_heals_onto_the_live_devices_and_the_pending_requests_follow() -> None:
    state = placed(cluster(["n0", "n1", "n2"]))
    before = the_instance(state)
    lost = before.shards[1].node_id
    old_zero = before.shards[0].runner_id
    state = task(state, old_zero, "waiting", "pending")
    state = applied(state, NodeTimedOut(node_id=lost))

    event = heal(the_instance(state), state, NOW, CONFIG)
    assert isinstance(event, InstanceReplacementStarted)
    change = event.replacement.change
    assert change.kind == "heal" and f"node {lost}" in change.reason
    assert lost not in {shard.node_id for shard in event.replacement.shards}
    assert len({shard.node_id for shard in event.replacement.shards}) == 2  # min_nodes kept
    state = applied(state, event)
    assert heal(the_instance(state), state, NOW, CONFIG) is None  # one change at a time

    incoming = event.replacement.shards
    assert progress_of_change(the_instance(state), state, NOW, CONFIG) is None  # loading
    state = with_runners(state, incoming, "ready")
    switch = progress_of_change(the_instance(state), state, NOW, CONFIG)
    assert isinstance(switch, InstanceReplaced)
    state = applied(state, switch)
    after = the_instance(state)
    assert after.shards == incoming and after.incoming is None
    assert after.retiring_shards == []  # a broken set is dropped, not retired
    assert after.changes[-1].outcome == "switched"
    assert state.tasks[TaskId("waiting")].runner_id == incoming[0].runner_id
    assert all(shard.runner_id not in state.runners for shard in before.shards)


def test_a_heal_that_no_longer_fits_marks_the_instance_failed_once() -> None:
    state = placed(cluster(["n0", "n1"]))
    state = task(state, the_instance(state).shards[0].runner_id, "running", "running")
    state = applied(state, NodeTimedOut(node_id=the_instance(state).shards[1].node_id))
    event = heal(the_instance(state), state, NOW, CONFIG)
    assert isinstance(event, InstanceFailed)
    assert "cannot be placed again" in event.reason and "2 nodes" in event.reason
    state = applied(state, event)
    assert the_instance(state).failure == event.reason
    assert state.tasks[TaskId("running")].status == "failed"
    assert heal(the_instance(state), state, NOW, CONFIG) is None  # nothing new to say


def test_a_runner_that_failed_keeps_the_heal_off_its_device() -> None:
    state = placed(cluster(["n0", "n1", "n2"]))
    bad = the_instance(state).shards[1]
    state = with_runners(state, [bad], "failed")
    event = heal(the_instance(state), state, NOW, CONFIG)
    assert isinstance(event, InstanceReplacementStarted)
    used = {(shard.node_id, shard.device_id) for shard in event.replacement.shards}
    assert (bad.node_id, bad.device_id) not in used


def test_rebalance_off_is_never_healed() -> None:
    state = placed(cluster(["n0", "n1", "n2"]), rebalance="off")
    state = applied(state, NodeTimedOut(node_id=the_instance(state).shards[1].node_id))
    assert heal(the_instance(state), state, NOW, CONFIG) is None


def healing(state: State) -> tuple[State, InstanceReplacementStarted]:
    """``state`` once the node of its instance's second shard left and the heal started."""
    state = applied(state, NodeTimedOut(node_id=the_instance(state).shards[1].node_id))
    started = heal(the_instance(state), state, NOW, CONFIG)
    assert isinstance(started, InstanceReplacementStarted)
    return applied(state, started), started


def test_a_failed_new_set_aborts_the_change_and_its_device_is_remembered() -> None:
    state, started = healing(placed(cluster(["n0", "n1", "n2"])))
    broken = started.replacement.shards[1]
    state = with_runners(state, [broken], "failed")
    aborted = progress_of_change(the_instance(state), state, NOW, CONFIG)
    assert isinstance(aborted, InstanceReplacementAborted)
    assert aborted.failed_devices == [(broken.node_id, broken.device_id)]
    state = applied(state, aborted)
    instance = the_instance(state)
    assert instance.incoming is None and instance.changes[-1].outcome == "aborted"
    assert broken.runner_id not in state.runners


def test_a_change_that_does_not_load_in_time_is_aborted() -> None:
    state, started = healing(placed(cluster(["n0", "n1", "n2"])))
    later = started.replacement.change.started_at + timedelta(seconds=CONFIG.load_timeout_s + 1)
    aborted = progress_of_change(the_instance(state), state, later, CONFIG)
    assert isinstance(aborted, InstanceReplacementAborted)
    assert "not all ready" in aborted.reason


def test_a_throttling_device_moves_the_instance_past_the_margin() -> None:
    calm = placed(cluster(["n0", "n1", "n2"]))
    assert move_candidate(the_instance(calm), calm, NOW, CONFIG) is None
    hot_node = the_instance(calm).shards[1].node_id
    state = with_second_shard_throttling(calm)
    candidate = move_candidate(the_instance(state), state, NOW, CONFIG)
    assert candidate is not None
    assert candidate.gain is not None and candidate.gain >= CONFIG.move_margin
    assert hot_node not in {shard.node_id for shard in candidate.fresh.shards}
    # Not with a margin the gain does not reach, nor when moves are not allowed.
    strict = CONFIG.model_copy(update={"move_margin": min(0.99, candidate.gain + 0.05)})
    assert move_candidate(the_instance(state), state, NOW, strict) is None
    for policy in ("heal_only", "off"):
        held = the_instance(state).model_copy(update={"rebalance": policy})
        assert move_candidate(held, state, NOW, CONFIG) is None


def finished_change(change_id: str, kind: ChangeKind, finished: datetime) -> PlacementChange:
    """A change that switched after 5 s, finishing at ``finished``."""
    return PlacementChange(
        change_id=change_id,
        kind=kind,
        reason="test",
        old_shards=[],
        new_shards=[],
        old_predicted_ms=2.0,
        new_predicted_ms=1.0,
        predicted_gain=0.5,
        started_at=finished - timedelta(seconds=5),
        finished_at=finished,
        outcome="switched",
    )


def test_moves_stop_at_the_hourly_limit_and_wait_to_settle() -> None:
    calm = placed(cluster(["n0", "n1", "n2"]))
    state = with_second_shard_throttling(calm)
    instance = the_instance(state)

    def move(started_minutes_ago: float) -> PlacementChange:
        finished = NOW - timedelta(minutes=started_minutes_ago) + timedelta(seconds=5)
        return finished_change(f"m{started_minutes_ago}", "move", finished)

    full = [move(50), move(40), move(30), move(20)]
    assert move_candidate(instance.model_copy(update={"changes": full}), state, NOW, CONFIG) is None
    old = [move(70), move(65), move(62), move(61)]  # over an hour ago: not counted
    assert move_candidate(instance.model_copy(update={"changes": old}), state, NOW, CONFIG)
    just_now = [move(0.2)]  # finished 7 s ago: settling
    assert (
        move_candidate(instance.model_copy(update={"changes": just_now}), state, NOW, CONFIG)
        is None
    )


def test_the_settle_time_counts_from_the_latest_finished_change() -> None:
    """An old move and a heal that finished moments ago: the instance is still settling
    (counting from the earliest finished change would allow a move at once)."""
    calm = placed(cluster(["n0", "n1", "n2"]))
    state = with_second_shard_throttling(calm)
    instance = the_instance(state)

    def change(change_id: str, kind: ChangeKind, finished_s_ago: float) -> PlacementChange:
        return finished_change(change_id, kind, NOW - timedelta(seconds=finished_s_ago))

    settled = [change("old", "move", CONFIG.settle_s + 600)]
    assert move_candidate(instance.model_copy(update={"changes": settled}), state, NOW, CONFIG)
    recent = [*settled, change("heal", "heal", CONFIG.settle_s / 2)]
    assert (
        move_candidate(instance.model_copy(update={"changes": recent}), state, NOW, CONFIG) is None
    )
    reversed_order = list(reversed(recent))
    assert (
        move_candidate(instance.model_copy(update={"changes": reversed_order}), state, NOW, CONFIG)
        is None
    )


def test_a_throttle_that_went_and_came_back_between_two_decisions_is_seen() -> None:
    """The rebalancer decides on states some way apart (a decision takes its time, and a
    worker sends only a device's newest reading); a device whose condition changed twice or
    more in between must restart a move's sustain time, one change must not."""
    before = cluster(["n0", "n1"])

    def with_changes(state: State, node: str, changes: int, hot: bool) -> State:
        reading = gpu_state(node, throttling=hot).model_copy(update={"condition_changes": changes})
        devices = {**state.gpu_device_state, NodeId(node): {reading.device_id: reading}}
        return state.model_copy(update={"gpu_device_state": devices})

    assert not condition_flipped_unseen(before, before)
    assert not condition_flipped_unseen(before, with_changes(before, "n0", 1, True))
    went_and_came_back = with_changes(before, "n0", 2, False)
    assert condition_flipped_unseen(before, went_and_came_back)
    assert condition_flipped_unseen(before, with_changes(before, "n1", 3, True))
    assert not condition_flipped_unseen(went_and_came_back, with_changes(before, "n0", 3, True))
    new_node = with_changes(before, "n2", 5, True)  # first seen now: nothing to compare
    assert not condition_flipped_unseen(before, new_node)


def test_a_manual_replace_starts_a_change_only_when_the_layout_differs() -> None:
    calm = placed(cluster(["n0", "n1", "n2"]))
    assert manual_replacement(the_instance(calm), calm) == []
    state = with_second_shard_throttling(calm)
    events = manual_replacement(the_instance(state), state)
    assert isinstance(events, list) and len(events) == 1
    started = events[0]
    assert isinstance(started, InstanceReplacementStarted)
    assert started.replacement.change.kind == "manual"
    state = applied(state, started)
    again = manual_replacement(the_instance(state), state)
    assert isinstance(again, CommandResult) and again.status_code == 409


def test_a_move_retires_the_old_set_which_keeps_its_requests() -> None:
    calm = placed(cluster(["n0", "n1", "n2"]))
    state = with_second_shard_throttling(calm)
    old = the_instance(state)
    state = task(state, old.shards[0].runner_id, "in-flight", "running")
    state = task(state, old.shards[0].runner_id, "queued", "pending")
    events = manual_replacement(old, state)
    assert isinstance(events, list)
    state = applied(state, *events)
    new = the_instance(state).shards_of("incoming")
    state = with_runners(state, new, "ready")
    switch = progress_of_change(the_instance(state), state, NOW, CONFIG)
    assert isinstance(switch, InstanceReplaced)
    state = applied(state, switch)
    instance = the_instance(state)
    assert instance.shards == new and instance.retiring_shards == old.shards
    assert instance.retiring_ring_endpoints == old.ring_endpoints
    # Requests bound to the old set stay with it (it is sound and may be generating them).
    assert state.tasks[TaskId("queued")].runner_id == old.shards[0].runner_id
    # The old set's runners leave the state as they stop; its ring ports go with the last.
    state = with_runners(state, old.shards, "shut_down")
    instance = the_instance(state)
    assert instance.retiring_shards == [] and instance.retiring_ring_endpoints == []


def test_a_device_that_has_not_run_is_judged_by_its_backends_measured_calibration() -> None:
    """Measured devices 5× slower than their datasheet do not make an unmeasured twin look
    5× faster (which would move the instance onto it, and back once it is measured)."""
    state = placed(cluster(["n0", "n1", "n2"]))
    measured = {
        shard.node_id: {
            shard.device_id: DeviceCalibration(
                node_id=shard.node_id,
                device_id=shard.device_id,
                model_id=MODEL,
                n_layers=shard.n_layers,
                factor=5.0,
                samples=3,
                measured_at=NOW,
            )
        }
        for shard in the_instance(state).shards
    }
    state = state.model_copy(update={"device_calibration": measured})
    assert move_candidate(the_instance(state), state, NOW, CONFIG) is None


def test_a_heal_names_the_lost_node_not_the_rank_it_stopped() -> None:
    """The surviving rank stops (its pipeline broke) before the master hears of the lost
    node: the heal's reason is still the node."""
    state = placed(cluster(["n0", "n1", "n2"]))
    survivor, lost = the_instance(state).shards
    state = with_runners(state, [survivor], "shut_down")
    state = applied(state, NodeTimedOut(node_id=lost.node_id))
    event = heal(the_instance(state), state, NOW, CONFIG)
    assert isinstance(event, InstanceReplacementStarted)
    assert event.replacement.change.reason == f"node {lost.node_id} (rank 1) left the cluster"
