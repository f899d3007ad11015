"""Instances, their runner sets and their tasks in the state: deletion, failure, the
replacement events of a heal or move (started, replaced, aborted) and the runner reports
that retire or forget a runner."""

from datetime import UTC, datetime, timedelta

from exo.shared.apply import apply_event
from exo.shared.tests.instances import GREEDY
from exo.shared.tests.test_apply import h100, link
from exo.shared.types.events import (
    Event,
    GPUDeviceInfoReported,
    InstanceCreated,
    InstanceDeleted,
    InstanceFailed,
    InstanceReplaced,
    InstanceReplacementAborted,
    InstanceReplacementStarted,
    MemberJoined,
    NodeInfoReported,
    NodeTimedOut,
    RunnerStatusUpdated,
    TaskCreated,
    TaskStatusUpdated,
)
from exo.shared.types.ids import CommandId, DeviceId, InstanceId, NodeId, RunnerId, TaskId
from exo.shared.types.instances import (
    Instance,
    PlacementChange,
    PlacementDecision,
    Replacement,
    Shard,
)
from exo.shared.types.node import NodeStaticInfo
from exo.shared.types.runners import RunnerStatus
from exo.shared.types.state import State
from exo.shared.types.tasks import ChatCompletionParams, Task, TaskStatus

NODE_A = NodeId("node-a")
NODE_B = NodeId("node-b")
GPU = DeviceId("cuda:0")
WHEN = datetime(2026, 1, 1, tzinfo=UTC)
INSTANCE = InstanceId("i")
OTHER = InstanceId("j")
OLD = [RunnerId("r0"), RunnerId("r1")]
NEW = [RunnerId("n0"), RunnerId("n1")]
OLD_ENDPOINTS = ["a:5000", "b:5000"]
NEW_ENDPOINTS = ["a:5001", "b:5001"]
MOVED = PlacementDecision(
    strategy="csp",
    heterogeneous=True,
    predicted_ms_per_token=0.5,
    greedy_ms_per_token=1.0,
    solve_ms=3.0,
)


def at(seconds: float) -> datetime:
    return WHEN + timedelta(seconds=seconds)


def applied(state: State, *events: Event) -> State:
    for event in events:
        state = apply_event(state, event)
    return state


def pipeline(runners: list[RunnerId]) -> list[Shard]:
    """Rank 0 on node A, rank 1 on node B, one runner each."""
    return [
        Shard(
            runner_id=runner,
            node_id=node,
            device_id=GPU,
            rank=rank,
            world_size=2,
            start_layer=rank * 8,
            end_layer=rank * 8 + 8,
        )
        for rank, (runner, node) in enumerate(zip(runners, (NODE_A, NODE_B), strict=True))
    ]


def two_node_instance(instance_id: InstanceId = INSTANCE, **update: object) -> Instance:
    """Serving on r0/r1 (``i``) or j0/j1 (any other id), with the old ring endpoints."""
    runners = OLD if instance_id == INSTANCE else [RunnerId(f"{instance_id}{n}") for n in (0, 1)]
    instance = Instance(
        instance_id=instance_id,
        model_id="m",
        shards=pipeline(runners),
        placement=GREEDY,
        ring_endpoints=OLD_ENDPOINTS,
    )
    return instance.model_copy(update=update)


def change(change_id: str = "c1") -> PlacementChange:
    return PlacementChange(
        change_id=change_id,
        kind="move",
        reason="faster",
        old_shards=pipeline(OLD),
        new_shards=pipeline(NEW),
        old_predicted_ms=1.0,
        new_predicted_ms=0.5,
        predicted_gain=0.5,
        started_at=WHEN,
    )


def started(
    change_id: str = "c1", instance_id: InstanceId = INSTANCE
) -> InstanceReplacementStarted:
    return InstanceReplacementStarted(
        instance_id=instance_id,
        replacement=Replacement(
            change=change(change_id),
            shards=pipeline(NEW),
            ring_endpoints=NEW_ENDPOINTS,
            placement=MOVED,
        ),
    )


def report(
    runner_id: RunnerId,
    status: RunnerStatus,
    node_id: NodeId = NODE_A,
    instance_id: InstanceId = INSTANCE,
    error: str | None = None,
) -> RunnerStatusUpdated:
    return RunnerStatusUpdated(
        runner_id=runner_id, instance_id=instance_id, node_id=node_id, status=status, error=error
    )


def ready(runners: list[RunnerId]) -> list[Event]:
    return [
        report(runner, "ready", node)
        for runner, node in zip(runners, (NODE_A, NODE_B), strict=True)
    ]


def task(
    task_id: str,
    runner_id: RunnerId | None,
    status: TaskStatus = "pending",
    instance_id: InstanceId = INSTANCE,
) -> TaskCreated:
    return TaskCreated(
        task=Task(
            task_id=TaskId(task_id),
            command_id=CommandId("c"),
            instance_id=instance_id,
            requested_by=NODE_A,
            params=ChatCompletionParams(model="m"),
            runner_id=runner_id,
            status=status,
        )
    )


def cluster(*instances: Instance) -> State:
    info = NodeStaticInfo(
        friendly_name="box", hostname="h", os="Linux", cpu_count=8, ram_total_bytes=1
    )
    nodes: list[Event] = [
        NodeInfoReported(node_id=node, info=info, ram_available_bytes=1, reported_at=WHEN)
        for node in (NODE_A, NODE_B)
    ]
    return applied(State(), *nodes, *(InstanceCreated(instance=each) for each in instances))


def serving() -> State:
    """Instance ``i`` serving on r0 (A) and r1 (B), both ready."""
    return applied(cluster(two_node_instance()), *ready(OLD))


def status_of(state: State, task_id: str) -> tuple[str, RunnerId | None, str | None]:
    found = state.tasks[TaskId(task_id)]
    return found.status, found.runner_id, found.error


# --- deletion and failure -----------------------------------------------------------------
def test_deleting_an_instance_removes_its_runners_and_tasks_only() -> None:
    other = two_node_instance(OTHER)
    state = applied(
        cluster(two_node_instance(), other),
        *ready(OLD),
        report(RunnerId("j0"), "ready", instance_id=OTHER),
        task("t-mine", OLD[0]),
        task("t-other", RunnerId("j0"), instance_id=OTHER),
    )
    after = apply_event(state, InstanceDeleted(instance_id=INSTANCE))
    assert after.instances == {OTHER: other}
    assert set(after.runners) == {RunnerId("j0")}
    assert after.runners[RunnerId("j0")] == state.runners[RunnerId("j0")]
    assert set(after.tasks) == {TaskId("t-other")}
    assert after.tasks[TaskId("t-other")] == state.tasks[TaskId("t-other")]
    assert after.nodes == state.nodes


def test_a_failed_instance_fails_its_unfinished_tasks_with_the_reason() -> None:
    other = two_node_instance(OTHER)
    state = applied(
        cluster(two_node_instance(), other),
        task("pending", OLD[0]),
        task("running", OLD[0], "running"),
        task("done", OLD[0], "complete"),
        task("elsewhere", RunnerId("j0"), instance_id=OTHER),
        task("elsewhere-running", RunnerId("j0"), "running", instance_id=OTHER),
    )
    after = apply_event(
        state, InstanceFailed(instance_id=INSTANCE, reason="the model no longer fits")
    )
    assert after.instances[INSTANCE] == two_node_instance(failure="the model no longer fits")
    assert after.instances[OTHER] == other
    for failed in ("pending", "running"):
        status, runner, error = status_of(after, failed)
        assert (status, runner) == ("failed", OLD[0])
        assert error is not None and "the model no longer fits" in error
    for untouched in ("done", "elsewhere", "elsewhere-running"):
        assert after.tasks[TaskId(untouched)] == state.tasks[TaskId(untouched)]


def test_a_failure_of_an_unknown_instance_changes_nothing() -> None:
    state = applied(serving(), task("t", OLD[0]))
    assert apply_event(state, InstanceFailed(instance_id=OTHER, reason="gone")) == state


def test_a_task_status_carries_its_error_and_an_unknown_task_is_ignored() -> None:
    state = applied(serving(), task("t", OLD[0]), task("u", OLD[0]))
    state = applied(
        state,
        TaskStatusUpdated(task_id=TaskId("t"), status="running"),
        TaskStatusUpdated(task_id=TaskId("t"), status="failed", error="out of memory"),
    )
    assert status_of(state, "t") == ("failed", OLD[0], "out of memory")
    assert status_of(state, "u") == ("pending", OLD[0], None)
    assert apply_event(state, TaskStatusUpdated(task_id=TaskId("zz"), status="complete")) == state


# --- runner reports -----------------------------------------------------------------------
def test_a_failed_runner_keeps_its_error() -> None:
    state = apply_event(serving(), report(OLD[1], "failed", NODE_B, error="cuda: out of memory"))
    runner = state.runners[OLD[1]]
    assert (runner.status, runner.error, runner.node_id) == (
        "failed",
        "cuda: out of memory",
        NODE_B,
    )
    # A later healthy report clears the error.
    state = apply_event(state, report(OLD[1], "starting", NODE_B))
    assert (state.runners[OLD[1]].status, state.runners[OLD[1]].error) == ("starting", None)


def test_a_report_for_an_unknown_instance_changes_nothing() -> None:
    state = serving()
    assert apply_event(state, report(RunnerId("z"), "ready", instance_id=OTHER)) == state


# --- replacement started ------------------------------------------------------------------
def test_a_replacement_starts_loading_beside_the_serving_set() -> None:
    earlier = change("c0").model_copy(update={"outcome": "switched", "finished_at": WHEN})
    state = applied(cluster(two_node_instance(changes=[earlier])), *ready(OLD))
    event = started()
    after = apply_event(state, event)
    instance = after.instances[INSTANCE]
    assert instance.incoming == event.replacement
    assert instance.changes == [earlier, change("c1")]
    # The serving set and its runners are untouched while the new set loads.
    assert instance.shards == pipeline(OLD) and instance.ring_endpoints == OLD_ENDPOINTS
    assert instance.placement == GREEDY
    assert after.runners == state.runners


def test_a_second_start_while_one_loads_and_a_start_for_an_unknown_instance_are_ignored() -> None:
    state = apply_event(serving(), started("c1"))
    assert apply_event(state, started("c2")) == state
    assert apply_event(state, started("c3", instance_id=OTHER)) == state


# --- replaced ------------------------------------------------------------------------------
def test_a_move_switches_to_the_new_set_and_the_old_one_retires() -> None:
    earlier = change("c0").model_copy(update={"outcome": "aborted", "finished_at": WHEN})
    measured = two_node_instance(
        changes=[earlier],
        failure="stale",
        measured_ms_per_token=7.0,
        measured_time_to_first_token_ms=90.0,
        measured_at=WHEN,
    )
    state = applied(
        cluster(measured),
        *ready(OLD),
        task("queued", OLD[0]),
        task("generating", OLD[0], "running"),
        started(),
        *ready(NEW),
    )
    after = apply_event(
        state, InstanceReplaced(instance_id=INSTANCE, change_id="c1", switched_at=at(30))
    )
    switched = change("c1").model_copy(update={"outcome": "switched", "finished_at": at(30)})
    assert after.instances[INSTANCE] == measured.model_copy(
        update={
            "shards": pipeline(NEW),
            "ring_endpoints": NEW_ENDPOINTS,
            "placement": MOVED,
            "retiring_shards": pipeline(OLD),
            "retiring_ring_endpoints": OLD_ENDPOINTS,
            "changes": [earlier, switched],
            "failure": None,
            "measured_ms_per_token": None,
            "measured_time_to_first_token_ms": None,
            "measured_at": None,
        }
    )
    # The sound old set keeps its runners and the requests bound to it.
    assert after.runners == state.runners
    assert set(after.runners) == {*OLD, *NEW}
    assert after.tasks == state.tasks


def test_a_heal_drops_the_broken_set_and_its_queued_requests_follow_the_new_rank_zero() -> None:
    other = two_node_instance(OTHER)
    state = applied(
        cluster(two_node_instance(), other),
        *ready(OLD),
        report(RunnerId("j0"), "ready", instance_id=OTHER),
        task("queued", OLD[0]),
        task("generating", OLD[0], "running"),
        task("on-rank-one", OLD[1]),
        task("unbound", None),
        task("elsewhere", RunnerId("j0"), instance_id=OTHER),
        report(OLD[1], "failed", NODE_B, error="crashed"),
        started(),
        *ready(NEW),
    )
    after = apply_event(
        state, InstanceReplaced(instance_id=INSTANCE, change_id="c1", switched_at=at(5))
    )
    instance = after.instances[INSTANCE]
    assert instance.shards == pipeline(NEW) and instance.ring_endpoints == NEW_ENDPOINTS
    # A broken set does not retire: it could not finish anything.
    assert instance.retiring_shards == [] and instance.retiring_ring_endpoints == []
    assert set(after.runners) == {*NEW, RunnerId("j0")}
    assert status_of(after, "queued") == ("pending", NEW[0], None)
    for kept in ("generating", "on-rank-one", "unbound", "elsewhere"):
        assert after.tasks[TaskId(kept)] == state.tasks[TaskId(kept)]
    assert after.instances[OTHER] == other


def test_a_switch_needs_the_loading_change_of_a_known_instance() -> None:
    loading = apply_event(serving(), started("c1"))
    idle = serving()
    assert apply_event(loading, InstanceReplaced(instance_id=INSTANCE, change_id="c9")) == loading
    assert apply_event(loading, InstanceReplaced(instance_id=OTHER, change_id="c1")) == loading
    assert apply_event(idle, InstanceReplaced(instance_id=INSTANCE, change_id="c1")) == idle


# --- aborted -------------------------------------------------------------------------------
def test_an_aborted_change_drops_the_new_set_and_records_why() -> None:
    earlier = change("c0").model_copy(update={"outcome": "switched", "finished_at": WHEN})
    state = applied(
        cluster(two_node_instance(changes=[earlier])),
        *ready(OLD),
        task("queued", OLD[0]),
        started(),
        report(NEW[0], "loading"),
        report(NEW[1], "failed", NODE_B, error="oom"),
    )
    after = apply_event(
        state,
        InstanceReplacementAborted(
            instance_id=INSTANCE,
            change_id="c1",
            reason="runner n1 failed",
            failed_devices=[(NODE_B, GPU)],
            aborted_at=at(12),
        ),
    )
    aborted = change("c1").model_copy(
        update={
            "outcome": "aborted",
            "outcome_reason": "runner n1 failed",
            "failed_devices": [(NODE_B, GPU)],
            "finished_at": at(12),
        }
    )
    assert after.instances[INSTANCE] == two_node_instance(changes=[earlier, aborted])
    assert set(after.runners) == set(OLD)
    assert after.runners[OLD[0]] == state.runners[OLD[0]]
    assert after.tasks == state.tasks


def test_an_abort_needs_the_loading_change_of_a_known_instance() -> None:
    loading = apply_event(serving(), started("c1"))
    idle = serving()

    def abort(instance_id: InstanceId, change_id: str) -> InstanceReplacementAborted:
        return InstanceReplacementAborted(instance_id=instance_id, change_id=change_id, reason="x")

    assert apply_event(loading, abort(INSTANCE, "c9")) == loading
    assert apply_event(loading, abort(OTHER, "c1")) == loading
    assert apply_event(idle, abort(INSTANCE, "c1")) == idle


# --- the retiring set ----------------------------------------------------------------------
def retired() -> State:
    """A move switched ``i`` to n0/n1; r0/r1 retire, still running."""
    return applied(
        serving(),
        started(),
        *ready(NEW),
        InstanceReplaced(instance_id=INSTANCE, change_id="c1", switched_at=at(1)),
        report(OLD[0], "running"),
        report(OLD[1], "running", NODE_B),
    )


def test_a_retiring_runner_that_stops_leaves_its_set_and_the_last_frees_the_ports() -> None:
    state = retired()
    assert state.instances[INSTANCE].retiring_shards == pipeline(OLD)
    assert state.runners[OLD[0]].status == "running"  # still finishing its requests
    state = apply_event(state, report(OLD[1], "failed", NODE_B, error="lost"))
    instance = state.instances[INSTANCE]
    assert instance.retiring_shards == pipeline(OLD)[:1]
    assert instance.retiring_ring_endpoints == OLD_ENDPOINTS
    assert set(state.runners) == {OLD[0], *NEW}
    state = apply_event(state, report(OLD[0], "shut_down"))
    instance = state.instances[INSTANCE]
    assert (instance.retiring_shards, instance.retiring_ring_endpoints) == ([], [])
    assert set(state.runners) == set(NEW)
    assert instance.shards == pipeline(NEW) and instance.ring_endpoints == NEW_ENDPOINTS


def test_a_lost_node_takes_its_retiring_shard_and_a_late_report_forgets_the_runner() -> None:
    state = apply_event(retired(), NodeTimedOut(node_id=NODE_B))
    instance = state.instances[INSTANCE]
    assert instance.retiring_shards == pipeline(OLD)[:1]
    assert instance.retiring_ring_endpoints == OLD_ENDPOINTS
    assert state.runners[OLD[1]].status == "failed"  # kept until it reports
    # The runner's set is gone: its late report removes it and leaves the rest.
    after = apply_event(state, report(OLD[1], "shut_down", NODE_B))
    assert set(after.runners) == {OLD[0], *NEW}
    assert after.runners == {k: v for k, v in state.runners.items() if k != OLD[1]}
    assert after.instances == state.instances


# --- a node that left -----------------------------------------------------------------------
def test_a_timed_out_node_takes_its_facts_links_runners_and_running_requests_with_it() -> None:
    node_c = NodeId("node-c")
    info = NodeStaticInfo(
        friendly_name="c", hostname="c", os="Linux", cpu_count=1, ram_total_bytes=1
    )
    device = h100(GPU)

    state = applied(
        serving(),
        NodeInfoReported(node_id=node_c, info=info, ram_available_bytes=1, reported_at=WHEN),
        *(MemberJoined(node_id=node) for node in (NODE_A, NODE_B, node_c)),
        GPUDeviceInfoReported(device_info=device),
        GPUDeviceInfoReported(device_info=device.model_copy(update={"node_id": NODE_B})),
        link(NODE_A, NODE_B),
        link(NODE_A, node_c),
        link(NODE_B, NODE_A),
        link(node_c, NODE_A),
        InstanceCreated(instance=two_node_instance(OTHER)),
        report(RunnerId("j1"), "shut_down", NODE_B, instance_id=OTHER),
        task("generating-on-b", OLD[1], "running"),
        task("queued-on-b", OLD[1]),
        task("done-on-b", OLD[1], "complete"),
        task("generating-on-a", OLD[0], "running"),
    )
    after = apply_event(state, NodeTimedOut(node_id=NODE_B))
    assert after.members == {NODE_A, node_c}
    assert set(after.nodes) == {NODE_A, node_c}
    assert after.gpu_device_info == {NODE_A: {GPU: device}}
    assert {source: set(links) for source, links in after.gpu_links.items()} == {
        NODE_A: {node_c},
        node_c: {NODE_A},
    }
    lost = after.runners[OLD[1]]
    assert lost.status == "failed" and lost.error is not None and NODE_B in lost.error
    assert after.runners[OLD[0]] == state.runners[OLD[0]]
    # A runner that had already stopped stays stopped.
    assert after.runners[RunnerId("j1")] == state.runners[RunnerId("j1")]
    # Only what the lost node was generating fails; queued requests wait for a heal.
    status, runner, error = status_of(after, "generating-on-b")
    assert (status, runner) == ("failed", OLD[1])
    assert error is not None and NODE_B in error
    for kept in ("queued-on-b", "done-on-b", "generating-on-a"):
        assert after.tasks[TaskId(kept)] == state.tasks[TaskId(kept)]
    assert after.instances == state.instances  # nothing of it was retiring
