from datetime import UTC, datetime

from exo.shared.tests.instances import GREEDY
from exo.shared.types.ids import CommandId, DeviceId, InstanceId, NodeId, RunnerId, TaskId
from exo.shared.types.instances import Instance, Shard
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
        StopRunner(runner_id=RunnerId("r0"))
    ]
    assert plan(state([], with_instance=False), HERE, local("shut_down")) == []


def test_stops_a_rank_whose_pipeline_broke() -> None:
    broken = state([runner_state("r0", HERE, "ready"), runner_state("r1", THERE, "failed")])
    assert plan(broken, HERE, local("ready")) == [StopRunner(runner_id=RunnerId("r0"))]


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
