"""Pure: what this node's worker should do next, given the cluster state and its runners.

``plan(state, node_id, local_runners)`` returns the actions, in order:

1. stop a local runner whose instance is gone, whose set the instance no longer has (an
   aborted change), whose set broke (another of its runners failed or its node left:
   the pipeline would block), or whose set retires and has no request left to finish;
2. start a runner for each shard of the serving or incoming set assigned to a device of
   this node that has none (make before break: both sets run during a move);
3. give a pending task to the rank-0 runner it is bound to once every runner of that set
   is ready (rank 0 drives the pipeline; the other ranks follow it);
4. cancel, in the runner, a forwarded task the cluster cancelled.
"""

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict

from exo.shared.runner_sets import SERVING_STATUSES, set_breakage, set_ready
from exo.shared.types.ids import InstanceId, NodeId, RunnerId, TaskId
from exo.shared.types.instances import RUNNER_SETS, Instance, RunnerSet, Shard, rank_zero_runner
from exo.shared.types.runners import RunnerStatus
from exo.shared.types.state import State
from exo.shared.types.tasks import Task


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
    reason: str


class ForwardTask(BaseModel):
    model_config = ConfigDict(frozen=True)

    runner_id: RunnerId
    task: Task


class CancelRunnerTask(BaseModel):
    model_config = ConfigDict(frozen=True)

    runner_id: RunnerId
    task_id: TaskId


Action = StartRunner | StopRunner | ForwardTask | CancelRunnerTask


def _stop_reason(state: State, local: LocalRunner) -> str | None:
    """Why the local runner must stop now (None: it goes on)."""
    instance = state.instances.get(local.instance_id)
    if instance is None:
        return "its instance was deleted"
    runner_set = instance.runner_set(local.runner_id)
    if runner_set is None:
        return "its instance no longer uses it (the change it was loading for ended)"
    shards = instance.shards_of(runner_set)
    broken = set_breakage(state, [s for s in shards if s.runner_id != local.runner_id])
    if broken is not None:
        return f"its pipeline broke: {broken}"
    if runner_set == "retiring":
        bound = rank_zero_runner(shards)
        if not any(
            task.runner_id == bound and task.status in ("pending", "running")
            for task in state.tasks.values()
        ):
            return "its instance moved and it has finished its requests"
    return None


def set_view(instance: Instance, runner_set: RunnerSet) -> Instance:
    """The instance as one of its sets' runners sees it: that set's shards and ring."""
    return instance.model_copy(
        update={
            "shards": instance.shards_of(runner_set),
            "ring_endpoints": instance.ring_endpoints_of(runner_set),
            "incoming": None,
            "retiring_shards": [],
            "retiring_ring_endpoints": [],
        }
    )


def runners_in_use(state: State) -> set[RunnerId]:
    """Every runner some set of some instance has."""
    return {
        shard.runner_id
        for instance in state.instances.values()
        for runner_set in RUNNER_SETS
        for shard in instance.shards_of(runner_set)
    }


def plan(
    state: State, node_id: NodeId, local_runners: Mapping[RunnerId, LocalRunner]
) -> list[Action]:
    actions: list[Action] = []
    for runner in local_runners.values():
        if runner.status in ("shut_down", "failed"):
            continue
        reason = _stop_reason(state, runner)
        if reason is not None:
            actions.append(StopRunner(runner_id=runner.runner_id, reason=reason))
    for instance in state.instances.values():
        for runner_set in ("serving", "incoming"):
            shards = instance.shards_of(runner_set)
            if set_breakage(state, shards) is not None:
                continue
            for shard in shards:
                if shard.node_id == node_id and shard.runner_id not in local_runners:
                    actions.append(
                        StartRunner(instance=set_view(instance, runner_set), shard=shard)
                    )
    for task in state.tasks.values():
        instance = state.instances.get(task.instance_id)
        if instance is None:
            continue
        bound = task.runner_id if task.runner_id is not None else rank_zero_runner(instance.shards)
        runner = local_runners.get(bound) if bound is not None else None
        if runner is None:
            continue
        if task.status == "pending" and task.task_id not in runner.forwarded_task_ids:
            if runner.status in SERVING_STATUSES and set_ready(
                state, instance.set_with(runner.runner_id)
            ):
                actions.append(ForwardTask(runner_id=runner.runner_id, task=task))
        elif (
            task.status == "cancelled"
            and task.task_id in runner.forwarded_task_ids
            and task.task_id not in runner.cancelled_task_ids
        ):
            actions.append(CancelRunnerTask(runner_id=runner.runner_id, task_id=task.task_id))
    return actions
