"""Pure: what this node's worker should do next, given the cluster state and its runners.

``plan(state, node_id, local_runners)`` returns the actions, in order:

1. stop a local runner whose instance is gone from the state, or another of whose
   instance's runners failed (the pipeline is broken);
2. start a runner for each shard assigned to a device of this node that has none;
3. give a pending task to the instance's rank-0 runner once every runner of the
   instance is ready (rank 0 drives the pipeline; the other ranks follow it);
4. cancel, in the runner, a forwarded task the cluster cancelled.
"""

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict

from exo.shared.types.ids import InstanceId, NodeId, RunnerId, TaskId
from exo.shared.types.instances import Instance, Shard
from exo.shared.types.runners import RunnerStatus
from exo.shared.types.state import State
from exo.shared.types.tasks import Task

SERVING_STATUSES: frozenset[RunnerStatus] = frozenset({"ready", "running"})


class LocalRunner(BaseModel):
    """A runner process of this node as its supervisor knows it."""

    model_config = ConfigDict(frozen=True)

    runner_id: RunnerId
    instance_id: InstanceId
    rank: int
    status: RunnerStatus
    forwarded_task_ids: frozenset[TaskId] = frozenset()
    cancelled_task_ids: frozenset[TaskId] = frozenset()


class StartRunner(BaseModel):
    model_config = ConfigDict(frozen=True)

    instance: Instance
    shard: Shard


class StopRunner(BaseModel):
    model_config = ConfigDict(frozen=True)

    runner_id: RunnerId


class ForwardTask(BaseModel):
    model_config = ConfigDict(frozen=True)

    runner_id: RunnerId
    task: Task


class CancelRunnerTask(BaseModel):
    model_config = ConfigDict(frozen=True)

    runner_id: RunnerId
    task_id: TaskId


Action = StartRunner | StopRunner | ForwardTask | CancelRunnerTask


def instance_ready(state: State, instance: Instance) -> bool:
    """Every shard's runner reports ready or running in the cluster state."""
    for shard in instance.shards:
        runner = state.runners.get(shard.runner_id)
        if runner is None or runner.status not in SERVING_STATUSES:
            return False
    return True


def _instance_failed(state: State, local: LocalRunner) -> bool:
    """Another runner of the instance failed: the ring is broken, this rank would block."""
    return any(
        runner.instance_id == local.instance_id
        and runner.runner_id != local.runner_id
        and runner.status == "failed"
        for runner in state.runners.values()
    )


def plan(
    state: State, node_id: NodeId, local_runners: Mapping[RunnerId, LocalRunner]
) -> list[Action]:
    actions: list[Action] = []
    for runner in local_runners.values():
        if runner.status in ("shut_down", "failed"):
            continue
        if runner.instance_id not in state.instances or _instance_failed(state, runner):
            actions.append(StopRunner(runner_id=runner.runner_id))
    for instance in state.instances.values():
        for shard in instance.shards:
            if shard.node_id == node_id and shard.runner_id not in local_runners:
                actions.append(StartRunner(instance=instance, shard=shard))
    for task in state.tasks.values():
        instance = state.instances.get(task.instance_id)
        if instance is None:
            continue
        rank_zero = next((shard for shard in instance.shards if shard.rank == 0), None)
        if rank_zero is None or rank_zero.node_id != node_id:
            continue
        runner = local_runners.get(rank_zero.runner_id)
        if runner is None:
            continue
        if task.status == "pending" and task.task_id not in runner.forwarded_task_ids:
            if runner.status in SERVING_STATUSES and instance_ready(state, instance):
                actions.append(ForwardTask(runner_id=runner.runner_id, task=task))
        elif (
            task.status == "cancelled"
            and task.task_id in runner.forwarded_task_ids
            and task.task_id not in runner.cancelled_task_ids
        ):
            actions.append(CancelRunnerTask(runner_id=runner.runner_id, task_id=task.task_id))
    return actions
