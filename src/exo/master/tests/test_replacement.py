"""Heal and move decisions on cluster states, applied through ``apply`` as nodes apply them."""

from datetime import UTC, datetime, timedelta

import pytest
from loguru import logger

from exo.master.commands import handle_command
from exo.master.replacement import (
    FAILED_DEVICE_MEMORY,
    Candidate,
    ReplacementConfig,
    _same_but_index,
    condition_flipped_unseen,
    describe_layout,
    fresh_placement,
    heal,
    manual_replacement,
    move_candidate,
    progress_of_change,
    replacement_started,
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
    PlacementObjective,
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


def placed_for(state: State, objective: PlacementObjective) -> State:
    events = handle_command(
        PlaceInstance(model_id=MODEL, min_nodes=2, objective=objective, allow_planning_only=True),
        state,
    )
    assert isinstance(events, list)
    state = applied(state, *events)
    return with_runners(state, the_instance(state).shards, "ready")


def test_a_fresh_placement_is_judged_in_the_instances_own_objective() -> None:
    """On the calm cluster it was placed on, an instance's fresh placement is its own layout,
    predicted alike for both: no gain, in ms per token (latency) or in the bottleneck
    stage's ms (throughput)."""
    for objective in ("latency", "throughput"):
        state = placed_for(cluster(["n0", "n1", "n2"]), objective)
        instance = the_instance(state)
        candidate = fresh_placement(instance, state)
        assert isinstance(candidate, Candidate)
        decision = candidate.fresh.placement
        assert decision.objective == objective
        expected = (
            decision.predicted_bottleneck_ms
            if objective == "throughput"
            else decision.predicted_ms_per_token
        )
        assert candidate.new_predicted_ms == expected
        assert candidate.gain == pytest.approx(0.0, abs=1e-9)
    latency = placed_for(cluster(["n0", "n1", "n2"]), "latency")
    decision = the_instance(latency).placement
    assert decision.predicted_bottleneck_ms != decision.predicted_ms_per_token  # they differ


def test_a_heal_keeps_the_instances_objective() -> None:
    state = placed_for(cluster(["n0", "n1", "n2"]), "throughput")
    state = applied(state, NodeTimedOut(node_id=the_instance(state).shards[1].node_id))
    started = heal(the_instance(state), state, NOW, CONFIG)
    assert isinstance(started, InstanceReplacementStarted)
    assert started.replacement.placement.objective == "throughput"
    state = applied(state, started, *ready(started))
    switch = progress_of_change(the_instance(state), state, NOW, CONFIG)
    assert isinstance(switch, InstanceReplaced)
    assert the_instance(applied(state, switch)).placement.objective == "throughput"


def ready(started: InstanceReplacementStarted) -> list[Event]:
    return [
        RunnerStatusUpdated(
            runner_id=shard.runner_id,
            instance_id=started.instance_id,
            node_id=shard.node_id,
            status="ready",
        )
        for shard in started.replacement.shards
    ]


def test_a_started_change_records_the_candidates_predictions_under_an_id_of_its_own() -> None:
    state = with_second_shard_throttling(placed(cluster(["n0", "n1", "n2"])))
    instance = the_instance(state)
    candidate = move_candidate(instance, state, NOW, CONFIG)
    assert candidate is not None
    first = replacement_started(instance, candidate, "move", "why", NOW)
    change = first.replacement.change
    assert change.old_shards == instance.shards and change.new_shards == candidate.fresh.shards
    assert change.old_predicted_ms == candidate.old_predicted_ms is not None
    assert change.new_predicted_ms == candidate.new_predicted_ms
    assert change.predicted_gain == candidate.gain is not None
    assert change.started_at == NOW and change.outcome == "loading"
    second = replacement_started(instance, candidate, "move", "why", NOW)
    assert second.replacement.change.change_id != change.change_id


def aborted_change(failed_on: Shard, finished: datetime) -> PlacementChange:
    """A change aborted at ``finished`` because its runner on ``failed_on``'s device
    failed."""
    return finished_change("aborted", "move", finished).model_copy(
        update={
            "outcome": "aborted",
            "outcome_reason": "runner r (rank 0) failed: out of memory",
            "failed_devices": [(failed_on.node_id, failed_on.device_id)],
        }
    )


def test_a_heal_leaves_out_a_device_where_a_recent_change_failed_for_ten_minutes() -> None:
    """Four nodes, the instance on two; one of them leaves. A change that failed on a spare
    node's device a moment ago keeps the heal off it (the decision says why), one that
    failed there ten minutes ago or more does not."""
    nodes = ["n0", "n1", "n2", "n3"]
    state = placed(cluster(nodes))
    serving = the_instance(state).shards
    state = applied(state, NodeTimedOut(node_id=serving[1].node_id))
    spare = next(node for node in nodes if node not in {s.node_id for s in serving})
    spare_shard = serving[0].model_copy(update={"node_id": NodeId(spare)})
    spare_device = f"{spare}/{spare_shard.device_id}"
    instance = the_instance(state)

    def heal_after(failed_ago: timedelta | None) -> InstanceReplacementStarted:
        change = aborted_change(spare_shard, NOW - (failed_ago or timedelta()))
        if failed_ago is None:
            change = change.model_copy(update={"finished_at": None})  # still loading
        healed = heal(instance.model_copy(update={"changes": [change]}), state, NOW, CONFIG)
        assert isinstance(healed, InstanceReplacementStarted)
        return healed

    def left_out(started: InstanceReplacementStarted) -> list[str]:
        return [reason for reason in started.replacement.placement.reasons if "left out" in reason]

    recent = heal_after(timedelta(minutes=1))
    assert spare not in {shard.node_id for shard in recent.replacement.shards}
    assert left_out(recent) == [
        f"telemetry only: {spare_device} left out: a runner failed there: "
        "runner r (rank 0) failed: out of memory"
    ]
    for not_recent in (FAILED_DEVICE_MEMORY, timedelta(hours=1), None):
        assert left_out(heal_after(not_recent)) == []


def heals(started_minutes_ago: list[float]) -> list[PlacementChange]:
    return [
        finished_change(f"h{index}", "heal", NOW - timedelta(minutes=ago) + timedelta(seconds=5))
        for index, ago in enumerate(started_minutes_ago)
    ]


def test_beyond_the_hourly_heals_the_instance_is_marked_failed() -> None:
    config = ReplacementConfig(max_heals_per_hour=3)
    state = placed(cluster(["n0", "n1", "n2"]))
    state = applied(state, NodeTimedOut(node_id=the_instance(state).shards[1].node_id))
    instance = the_instance(state)
    broken = f"node {instance.shards[1].node_id} (rank 1) left the cluster"

    def healed(changes: list[PlacementChange]) -> Event | None:
        return heal(instance.model_copy(update={"changes": changes}), state, NOW, config)

    assert isinstance(healed(heals([30, 20])), InstanceReplacementStarted)
    assert isinstance(healed(heals([60, 60, 50, 40])), InstanceReplacementStarted)  # an hour ago
    moves = [finished_change(f"m{index}", "move", NOW) for index in range(5)]
    assert isinstance(healed(moves), InstanceReplacementStarted)  # moves are not heals
    failed = healed(heals([30, 20, 10]))
    assert isinstance(failed, InstanceFailed)
    assert failed.instance_id == instance.instance_id
    assert failed.reason == (
        f"{broken}; it was healed 3 times in the last hour, so it is not healed again "
        "(POST /instance/{id}/replace tries once more)"
    )
    already = instance.model_copy(update={"changes": heals([30, 20, 10]), "failure": failed.reason})
    assert heal(already, state, NOW, config) is None  # said once


def test_a_change_is_aborted_only_after_the_load_timeout() -> None:
    state, started = healing(placed(cluster(["n0", "n1", "n2"])))
    deadline = started.replacement.change.started_at + timedelta(seconds=CONFIG.load_timeout_s)
    assert progress_of_change(the_instance(state), state, deadline, CONFIG) is None
    late = deadline + timedelta(milliseconds=1)
    assert isinstance(
        progress_of_change(the_instance(state), state, late, CONFIG), InstanceReplacementAborted
    )


def test_no_move_while_the_old_set_retires_or_the_instance_failed() -> None:
    state = with_second_shard_throttling(placed(cluster(["n0", "n1", "n2"])))
    instance = the_instance(state)
    assert move_candidate(instance, state, NOW, CONFIG) is not None
    retiring = instance.model_copy(update={"retiring_shards": instance.shards[:1]})
    assert move_candidate(retiring, state, NOW, CONFIG) is None
    failed = instance.model_copy(update={"failure": "it cannot be placed again"})
    assert move_candidate(failed, state, NOW, CONFIG) is None


def test_a_move_needs_at_least_the_margin_and_the_settle_time() -> None:
    state = with_second_shard_throttling(placed(cluster(["n0", "n1", "n2"])))
    instance = the_instance(state)
    candidate = move_candidate(instance, state, NOW, CONFIG)
    assert candidate is not None and candidate.gain is not None
    exactly = CONFIG.model_copy(update={"move_margin": candidate.gain})
    assert move_candidate(instance, state, NOW, exactly) is not None
    settled = [finished_change("done", "heal", NOW - timedelta(seconds=CONFIG.settle_s))]
    assert move_candidate(instance.model_copy(update={"changes": settled}), state, NOW, CONFIG)
    hour = [finished_change(f"m{index}", "move", NOW - timedelta(hours=1)) for index in range(4)]
    hour = [change.model_copy(update={"started_at": NOW - timedelta(hours=1)}) for change in hour]
    assert move_candidate(instance.model_copy(update={"changes": hour}), state, NOW, CONFIG)


def test_looking_for_a_move_every_second_logs_nothing_at_info() -> None:
    state = with_second_shard_throttling(placed(cluster(["n0", "n1", "n2"])))
    lines: list[str] = []
    handler = logger.add(lambda message: lines.append(str(message)), level="INFO")
    try:
        assert move_candidate(the_instance(state), state, NOW, CONFIG) is not None
    finally:
        logger.remove(handler)
    assert lines == []


def test_a_manual_replace_of_a_changing_instance_is_a_conflict_that_names_the_change() -> None:
    state, started = healing(placed(cluster(["n0", "n1", "n2"])))
    instance = the_instance(state)
    refused = manual_replacement(instance, state)
    assert isinstance(refused, CommandResult)
    assert not refused.ok and refused.status_code == 409
    change = started.replacement.change
    assert refused.error == (
        f"instance {instance.instance_id} is already changing (heal: {change.reason})"
    )


def test_a_manual_replace_gives_its_reason_and_gain() -> None:
    state = with_second_shard_throttling(placed(cluster(["n0", "n1", "n2"])))
    before = datetime.now(UTC)
    events = manual_replacement(the_instance(state), state)
    after = datetime.now(UTC)
    assert isinstance(events, list)
    [started] = events
    assert isinstance(started, InstanceReplacementStarted)
    change = started.replacement.change
    assert change.predicted_gain is not None
    assert change.reason == (
        "requested through POST /instance/{id}/replace "
        f"(predicted gain {change.predicted_gain:.0%})"
    )
    assert before <= change.started_at <= after
    # A node of the layout is gone: no prediction for it, so no gain to give.
    lost = applied(state, NodeTimedOut(node_id=the_instance(state).shards[1].node_id))
    events = manual_replacement(the_instance(lost), lost)
    assert isinstance(events, list)
    [started] = events
    assert isinstance(started, InstanceReplacementStarted)
    assert started.replacement.change.predicted_gain is None
    assert started.replacement.change.reason == "requested through POST /instance/{id}/replace"


def test_a_manual_replace_of_a_broken_instance_leaves_out_its_failed_devices() -> None:
    """A serving set whose runner failed: the replace avoids that device like a heal does.
    A serving set that is sound is placed afresh on every device, even one where an earlier
    change failed (the operator asks for a fresh decision)."""
    state = placed(cluster(["n0", "n1", "n2"]))
    bad = the_instance(state).shards[1]
    broken = with_runners(state, [bad], "failed")
    events = manual_replacement(the_instance(broken), broken)
    assert isinstance(events, list)
    [started] = events
    assert isinstance(started, InstanceReplacementStarted)
    used = {(shard.node_id, shard.device_id) for shard in started.replacement.shards}
    assert (bad.node_id, bad.device_id) not in used
    assert started.replacement.change.reason.startswith("requested through POST")
    # Its earlier changes (here one long finished) do not get in the way.
    with_history = the_instance(broken).model_copy(
        update={"changes": [aborted_change(bad, NOW - timedelta(hours=1))]}
    )
    events = manual_replacement(with_history, broken)
    assert isinstance(events, list) and len(events) == 1
    # Sound, with a change that failed a moment ago on one of its own devices: nothing to
    # change.
    just_now = aborted_change(bad, datetime.now(UTC))
    sound = the_instance(state).model_copy(update={"changes": [just_now]})
    assert manual_replacement(sound, state) == []


def test_a_layout_is_described_rank_by_rank() -> None:
    state = placed(cluster(["n0", "n1", "n2"]))
    first, second = the_instance(state).shards
    expected = (
        f"{first.node_id}/{first.device_id} layers {first.start_layer}-{first.end_layer}, "
        f"{second.node_id}/{second.device_id} layers {second.start_layer}-{second.end_layer}"
    )
    assert describe_layout([first, second]) == expected
    assert describe_layout([second, first]) == expected


def test_a_fresh_placement_keeps_the_instances_policy_and_node_count() -> None:
    for policy in ("heal_only", "off", "auto"):
        events = handle_command(
            PlaceInstance(model_id=MODEL, min_nodes=2, rebalance=policy, allow_planning_only=True),
            cluster(["n0", "n1", "n2"]),
        )
        assert isinstance(events, list)
        placed = applied(cluster(["n0", "n1", "n2"]), *events)
        state = with_runners(placed, the_instance(placed).shards, "ready")
        instance = the_instance(state)
        candidate = fresh_placement(instance, state)
        assert isinstance(candidate, Candidate)
        assert candidate.fresh.rebalance == policy
        assert candidate.fresh.min_nodes == 2
        assert candidate.fresh.instance_id == instance.instance_id


def test_only_a_moved_applied_index_counts_as_the_same_state() -> None:
    """The rebalancer skips a decision when nothing but the applied index moved (a stream's
    chunks); any other change must be decided on."""
    state = placed_for(cluster(["n0", "n1", "n2"]), "latency")
    assert not _same_but_index(state, None)
    later = state.model_copy(update={"last_event_applied_idx": state.last_event_applied_idx + 5})
    assert _same_but_index(later, state)
    assert _same_but_index(state, state)
    joined = later.model_copy(update={"nodes": {**later.nodes, NodeId("n3"): node_info("n3")}})
    assert not _same_but_index(joined, state)
