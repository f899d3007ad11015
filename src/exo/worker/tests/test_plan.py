from datetime import UTC, datetime

from exo.master.tests.placement_helpers import node_info
from exo.shared.tests.instances import GREEDY
from exo.shared.types.ids import CommandId, DeviceId, InstanceId, NodeId, RunnerId, TaskId
from exo.shared.types.instances import Instance, PlacementChange, Replacement, Shard
from exo.shared.types.runners import RunnerState, RunnerStatus
from exo.shared.types.state import State
from exo.shared.types.tasks import ChatCompletionParams, Task, TaskStatus
from exo.worker.plan import (
    CancelRunnerTask,
    ForwardTask,
    LocalRunner,
    StartRunner,
    StopRunner,
    plan,
)

HERE = NodeId("here")
THERE = NodeId("there")
INSTANCE = InstanceId("instance-1")
WHEN = datetime(2026, 1, 1, tzinfo=UTC)


def instance() -> Instance:
    decision = GREEDY
    shards = [
        Shard(
            runner_id=RunnerId("r0"),
            node_id=HERE,
            device_id=DeviceId("cpu:0"),
            rank=0,
            world_size=2,
            start_layer=0,
            end_layer=15,
        ),
        Shard(
            runner_id=RunnerId("r1"),
            node_id=THERE,
            device_id=DeviceId("cpu:0"),
            rank=1,
            world_size=2,
            start_layer=15,
            end_layer=30,
        ),
    ]
    return Instance(instance_id=INSTANCE, model_id="m", shards=shards, placement=decision)


def runner_state(runner_id: str, node: NodeId, status: RunnerStatus) -> RunnerState:
    return RunnerState(
        runner_id=RunnerId(runner_id), instance_id=INSTANCE, node_id=node, status=status
    )


def task(task_id: str, status: TaskStatus = "pending") -> Task:
    params = ChatCompletionParams(model="m")
    return Task(
        task_id=TaskId(task_id),
        command_id=CommandId("c"),
        instance_id=INSTANCE,
        requested_by=HERE,
        params=params,
        status=status,
    )


def local(
    status: RunnerStatus, forwarded: set[str] | None = None, cancelled: set[str] | None = None
) -> dict[RunnerId, LocalRunner]:
    runner = LocalRunner(
        runner_id=RunnerId("r0"),
        instance_id=INSTANCE,
        rank=0,
        status=status,
        forwarded_task_ids=frozenset(TaskId(t) for t in forwarded or set()),
        cancelled_task_ids=frozenset(TaskId(t) for t in cancelled or set()),
    )
    return {runner.runner_id: runner}


def state(
    runners: list[RunnerState], tasks: list[Task] | None = None, with_instance: bool = True
) -> State:
    return State(
        nodes={node: node_info(node) for node in (HERE, THERE)},
        instances={INSTANCE: instance()} if with_instance else {},
        runners={runner.runner_id: runner for runner in runners},
        tasks={t.task_id: t for t in tasks or []},
    )


def test_starts_a_runner_only_for_this_nodes_shard() -> None:
    actions = plan(state([]), HERE, {})
    assert actions == [StartRunner(instance=instance(), shard=instance().shards[0])]
    assert plan(state([]), NodeId("elsewhere"), {}) == []


def test_does_not_start_twice() -> None:
    assert plan(state([]), HERE, local("loading")) == []


def test_stops_runners_whose_instance_is_gone() -> None:
    assert plan(state([], with_instance=False), HERE, local("ready")) == [
        StopRunner(runner_id=RunnerId("r0"), reason="its instance was deleted")
    ]
    assert plan(state([], with_instance=False), HERE, local("shut_down")) == []


def test_stops_a_rank_whose_pipeline_broke() -> None:
    broken = state([runner_state("r0", HERE, "ready"), runner_state("r1", THERE, "failed")])
    assert [type(action) for action in plan(broken, HERE, local("ready"))] == [StopRunner]
    stop = plan(broken, HERE, local("ready"))[0]
    assert isinstance(stop, StopRunner) and "r1 (rank 1) failed" in stop.reason


def test_forwards_pending_tasks_only_when_every_rank_is_ready() -> None:
    pending = task("t1")
    loading = state(
        [runner_state("r0", HERE, "ready"), runner_state("r1", THERE, "loading")], [pending]
    )
    assert plan(loading, HERE, local("ready")) == []
    ready = state(
        [runner_state("r0", HERE, "ready"), runner_state("r1", THERE, "ready")], [pending]
    )
    assert plan(ready, HERE, local("ready")) == [
        ForwardTask(runner_id=RunnerId("r0"), task=pending)
    ]
    # Only rank 0's node forwards; a task is forwarded once.
    assert plan(ready, THERE, {}) == [StartRunner(instance=instance(), shard=instance().shards[1])]
    assert plan(ready, HERE, local("ready", forwarded={"t1"})) == []


def test_cancels_a_forwarded_task_once() -> None:
    runners = [runner_state("r0", HERE, "running"), runner_state("r1", THERE, "running")]
    cancelled = state(runners, [task("t1", "cancelled")])
    assert plan(cancelled, HERE, local("running", forwarded={"t1"})) == [
        CancelRunnerTask(runner_id=RunnerId("r0"), task_id=TaskId("t1"))
    ]
    assert plan(cancelled, HERE, local("running", forwarded={"t1"}, cancelled={"t1"})) == []
    assert plan(cancelled, HERE, local("running")) == []


def moved(retiring: bool) -> Instance:
    """The instance after a move from r0/r1 to n0/n1 (r0/r1 retiring), or while that move
    loads (r0/r1 serving, n0/n1 incoming)."""
    old = instance()
    new = [
        shard.model_copy(update={"runner_id": RunnerId(f"n{shard.rank}")}) for shard in old.shards
    ]
    if retiring:
        return old.model_copy(update={"shards": new, "retiring_shards": old.shards})
    change = PlacementChange(
        change_id="c1",
        kind="move",
        reason="test",
        old_shards=old.shards,
        new_shards=new,
        old_predicted_ms=2.0,
        new_predicted_ms=1.0,
        predicted_gain=0.5,
        started_at=WHEN,
    )
    return old.model_copy(
        update={
            "incoming": Replacement(
                change=change, shards=new, ring_endpoints=["a:1", "b:2"], placement=GREEDY
            )
        }
    )


def with_instance(base: State, changed: Instance) -> State:
    return base.model_copy(update={"instances": {INSTANCE: changed}})


def test_a_move_starts_the_incoming_set_beside_the_serving_one() -> None:
    serving = [runner_state("r0", HERE, "ready"), runner_state("r1", THERE, "ready")]
    loading = with_instance(state(serving), moved(retiring=False))
    actions = plan(loading, HERE, local("ready"))
    assert len(actions) == 1 and isinstance(actions[0], StartRunner)
    assert actions[0].shard.runner_id == RunnerId("n0")
    # The runner sees its own set: its shards and its ring.
    assert actions[0].instance.ring_endpoints == ["a:1", "b:2"]
    assert [shard.runner_id for shard in actions[0].instance.shards] == ["n0", "n1"]


def test_a_runner_of_an_aborted_change_is_stopped() -> None:
    serving = [runner_state("r0", HERE, "ready"), runner_state("r1", THERE, "ready")]
    orphan = LocalRunner(runner_id=RunnerId("gone"), instance_id=INSTANCE, rank=0, status="loading")
    actions = plan(state(serving), HERE, {**local("ready"), orphan.runner_id: orphan})
    assert actions == [
        StopRunner(
            runner_id=RunnerId("gone"),
            reason="its instance no longer uses it (the change it was loading for ended)",
        )
    ]


def test_a_retiring_set_serves_its_requests_then_stops() -> None:
    runners = [
        runner_state(name, node, "ready")
        for name, node in (("r0", HERE), ("r1", THERE), ("n0", HERE), ("n1", THERE))
    ]
    bound = task("t1").model_copy(update={"runner_id": RunnerId("r0")})
    old_and_new = {
        RunnerId("n0"): LocalRunner(
            runner_id=RunnerId("n0"), instance_id=INSTANCE, rank=0, status="ready"
        ),
        **local("ready"),
    }
    busy = with_instance(state(runners, [bound]), moved(retiring=True))
    # The pending request bound to the old rank 0 goes to it, not to the new one.
    assert plan(busy, HERE, old_and_new) == [ForwardTask(runner_id=RunnerId("r0"), task=bound)]
    running = with_instance(
        state(runners, [bound.model_copy(update={"status": "running"})]), moved(retiring=True)
    )
    assert plan(running, HERE, old_and_new) == []
    done = with_instance(
        state(runners, [bound.model_copy(update={"status": "complete"})]), moved(retiring=True)
    )
    assert plan(done, HERE, old_and_new) == [
        StopRunner(
            runner_id=RunnerId("r0"), reason="its instance moved and it has finished its requests"
        )
    ]
