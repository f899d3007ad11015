"""The only way state changes: ``apply(state, indexed_event) -> State``, a pure function.

Times stored in state come from the events themselves, never from the clock at apply
time, so every node that applies the same log holds the same state.

Dispatch is a ``match`` over the event union ending in ``assert_never``, so an event type
that is added to the union without a handler fails type checking.
"""

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TypeVar, assert_never

from loguru import logger

from exo.shared.runner_sets import set_breakage
from exo.shared.types.calibration import DeviceCalibration
from exo.shared.types.events import (
    ChunkGenerated,
    DeviceGPUStatesUpdated,
    DeviceGPUStateUpdated,
    Event,
    EventElided,
    GPUBandwidthMeasured,
    GPUDeviceInfoReported,
    IndexedEvent,
    InstanceCreated,
    InstanceDeleted,
    InstanceFailed,
    InstanceReplaced,
    InstanceReplacementAborted,
    InstanceReplacementStarted,
    MasterElected,
    MemberJoined,
    NodeInfoReported,
    NodeMemoryUpdated,
    NodeTimedOut,
    ProbeEmitted,
    RunnerStatusUpdated,
    StageTimeMeasured,
    TaskCreated,
    TaskStatusUpdated,
)
from exo.shared.types.gpu import DeviceGPUState, GPULink
from exo.shared.types.ids import DeviceId, NodeId, RunnerId, TaskId
from exo.shared.types.instances import (
    CHANGES_KEPT,
    Instance,
    PlacementChange,
    Shard,
    rank_zero_runner,
)
from exo.shared.types.node import NodeInfo
from exo.shared.types.runners import RunnerState
from exo.shared.types.state import State
from exo.shared.types.tasks import Task

V = TypeVar("V")

FINISHED_TASK_STATUSES = frozenset({"complete", "failed", "cancelled"})
FINISHED_TASKS_KEPT = 1000
"""Finished tasks stay in the state for inspection; past this many, the oldest go."""
CALIBRATION_NEW_SAMPLE_WEIGHT = 0.5
"""A device's calibration factor moves this far towards each new measurement."""


class EventOutOfOrderError(ValueError):
    """An indexed event was applied to a state that is not exactly one index behind it."""


def apply(state: State, indexed_event: IndexedEvent) -> State:
    """Apply the next event of the global log. Raises if it is not the next index."""
    expected = state.last_event_applied_idx + 1
    if indexed_event.idx != expected:
        raise EventOutOfOrderError(f"expected event index {expected}, got {indexed_event.idx}")
    new_state = apply_event(state, indexed_event.event)
    return new_state.model_copy(update={"last_event_applied_idx": indexed_event.idx})


def apply_event(state: State, event: Event) -> State:
    match event:
        case MasterElected():
            return state.model_copy(update={"master_node_id": event.master_node_id})
        case MemberJoined():
            return state.model_copy(update={"members": state.members | {event.node_id}})
        case NodeInfoReported():
            return apply_node_info_reported(state, event)
        case NodeMemoryUpdated():
            return apply_node_memory_updated(state, event)
        case NodeTimedOut():
            return apply_node_timed_out(state, event)
        case GPUDeviceInfoReported():
            return apply_gpu_device_info_reported(state, event)
        case DeviceGPUStateUpdated():
            return apply_device_gpu_state_updated(state, event)
        case DeviceGPUStatesUpdated():
            return apply_device_gpu_states_updated(state, event)
        case GPUBandwidthMeasured():
            return apply_gpu_bandwidth_measured(state, event)
        case InstanceCreated():
            instances = {**state.instances, event.instance.instance_id: event.instance}
            return state.model_copy(update={"instances": instances})
        case InstanceDeleted():
            return apply_instance_deleted(state, event)
        case InstanceReplacementStarted():
            return apply_instance_replacement_started(state, event)
        case InstanceReplaced():
            return apply_instance_replaced(state, event)
        case InstanceReplacementAborted():
            return apply_instance_replacement_aborted(state, event)
        case InstanceFailed():
            return apply_instance_failed(state, event)
        case RunnerStatusUpdated():
            return apply_runner_status_updated(state, event)
        case TaskCreated():
            return state.model_copy(
                update={"tasks": {**state.tasks, event.task.task_id: event.task}}
            )
        case TaskStatusUpdated():
            return apply_task_status_updated(state, event)
        case StageTimeMeasured():
            return apply_stage_time_measured(state, event)
        case ChunkGenerated() | ProbeEmitted() | EventElided():
            return state
        case _:
            assert_never(event)


def _without_node(mapping: Mapping[NodeId, V], node_id: NodeId) -> dict[NodeId, V]:
    return {key: value for key, value in mapping.items() if key != node_id}


def apply_node_info_reported(state: State, event: NodeInfoReported) -> State:
    info = event.info
    node = NodeInfo(
        node_id=event.node_id,
        friendly_name=info.friendly_name,
        hostname=info.hostname,
        os=info.os,
        cpu_count=info.cpu_count,
        ram_total_bytes=info.ram_total_bytes,
        ram_available_bytes=event.ram_available_bytes,
        network_interfaces=info.network_interfaces,
        api_port=info.api_port,
        ring_port=info.ring_port,
        execution=info.execution,
        last_seen=event.reported_at,
    )
    return state.model_copy(update={"nodes": {**state.nodes, event.node_id: node}})


def apply_node_memory_updated(state: State, event: NodeMemoryUpdated) -> State:
    node = state.nodes.get(event.node_id)
    if node is None:
        logger.debug(f"memory update for unknown node {event.node_id} ignored")
        return state
    updated = node.model_copy(
        update={"ram_available_bytes": event.ram_available_bytes, "last_seen": event.reported_at}
    )
    return state.model_copy(update={"nodes": {**state.nodes, event.node_id: updated}})


def apply_node_timed_out(state: State, event: NodeTimedOut) -> State:
    node_id = event.node_id
    lost_runners = {
        runner_id for runner_id, runner in state.runners.items() if runner.node_id == node_id
    }
    tasks = _fail_tasks(
        state.tasks,
        lambda task: task.status == "running" and task.runner_id in lost_runners,
        f"node {node_id} left while generating this request",
    )
    instances = {
        instance_id: _without_retiring_on(instance, node_id)
        for instance_id, instance in state.instances.items()
    }
    return state.model_copy(
        update={
            "tasks": tasks,
            "instances": instances,
            "members": state.members - {node_id},
            "nodes": _without_node(state.nodes, node_id),
            "gpu_device_info": _without_node(state.gpu_device_info, node_id),
            "gpu_device_state": _without_node(state.gpu_device_state, node_id),
            "gpu_links": {
                source: {dest: link for dest, link in links.items() if dest != node_id}
                for source, links in state.gpu_links.items()
                if source != node_id
            },
            "runners": {
                runner_id: (
                    runner.model_copy(
                        update={"status": "failed", "error": f"node {node_id} timed out"}
                    )
                    if runner.node_id == node_id and runner.status != "shut_down"
                    else runner
                )
                for runner_id, runner in state.runners.items()
            },
        }
    )


def apply_gpu_device_info_reported(state: State, event: GPUDeviceInfoReported) -> State:
    info = event.device_info
    if info.node_id not in state.nodes:
        return state  # a late report from a node that timed out; it reports again on rejoin
    devices = {**state.gpu_device_info.get(info.node_id, {}), info.device_id: info}
    return state.model_copy(
        update={"gpu_device_info": {**state.gpu_device_info, info.node_id: devices}}
    )


def apply_device_gpu_state_updated(state: State, event: DeviceGPUStateUpdated) -> State:
    reading = event.device_state
    return _apply_device_readings(state, reading.node_id, [reading], [], reading.last_update)


def apply_device_gpu_states_updated(state: State, event: DeviceGPUStatesUpdated) -> State:
    return _apply_device_readings(
        state, event.node_id, event.device_states, event.unchanged_device_ids, event.sampled_at
    )


def _apply_device_readings(
    state: State,
    node_id: NodeId,
    readings: Sequence[DeviceGPUState],
    unchanged_device_ids: Sequence[DeviceId],
    sampled_at: datetime,
) -> State:
    """The one rule for live readings, singular or per pass: a full reading replaces the
    stored one; an unchanged device's stored reading gets ``last_update = sampled_at`` (when
    one is stored and ``sampled_at`` is newer); the node's ``last_seen`` moves to the newest
    time the event carries. Readings of a node not in the state are ignored."""
    node = state.nodes.get(node_id)
    if node is None:
        return state  # a late reading from a node that timed out
    devices = dict(state.gpu_device_state.get(node_id, {}))
    for reading in readings:
        devices[reading.device_id] = reading
    for device_id in unchanged_device_ids:
        stored = devices.get(device_id)
        if stored is not None and sampled_at > stored.last_update:
            devices[device_id] = stored.model_copy(update={"last_update": sampled_at})
    gpu_device_state = {**state.gpu_device_state, node_id: devices}
    newest = max([sampled_at, *(reading.last_update for reading in readings)])
    nodes = state.nodes
    if newest > node.last_seen:
        nodes = {**nodes, node_id: node.model_copy(update={"last_seen": newest})}
    return state.model_copy(update={"gpu_device_state": gpu_device_state, "nodes": nodes})


def apply_gpu_bandwidth_measured(state: State, event: GPUBandwidthMeasured) -> State:
    if event.source_node_id not in state.nodes or event.dest_node_id not in state.nodes:
        return state
    link = GPULink(
        source_node_id=event.source_node_id,
        dest_node_id=event.dest_node_id,
        bandwidth_mbps=event.bandwidth_mbps,
        latency_ms=event.latency_ms,
        measurement_count=event.measurement_count,
        measured_at=event.measured_at,
    )
    links = {**state.gpu_links.get(event.source_node_id, {}), event.dest_node_id: link}
    return state.model_copy(update={"gpu_links": {**state.gpu_links, event.source_node_id: links}})


def apply_instance_deleted(state: State, event: InstanceDeleted) -> State:
    instances = {k: v for k, v in state.instances.items() if k != event.instance_id}
    runners = {k: v for k, v in state.runners.items() if v.instance_id != event.instance_id}
    tasks = {k: v for k, v in state.tasks.items() if v.instance_id != event.instance_id}
    return state.model_copy(update={"instances": instances, "runners": runners, "tasks": tasks})


def apply_runner_status_updated(state: State, event: RunnerStatusUpdated) -> State:
    instance = state.instances.get(event.instance_id)
    if instance is None:
        return state
    runner_set = instance.runner_set(event.runner_id)
    if runner_set is None:
        # A runner of a set the instance no longer has (an aborted change, a dropped set).
        return state.model_copy(update={"runners": _without_runners(state, {event.runner_id})})
    if runner_set == "retiring" and event.status in ("shut_down", "failed"):
        retiring = [s for s in instance.retiring_shards if s.runner_id != event.runner_id]
        instances = {**state.instances, instance.instance_id: _with_retiring(instance, retiring)}
        runners = _without_runners(state, {event.runner_id})
        return state.model_copy(update={"instances": instances, "runners": runners})
    previous = state.runners.get(event.runner_id)
    # Load progress: a status without it keeps the last known values (a ready runner shows
    # what it loaded), except a fresh start, which knows nothing yet.
    kept = previous if previous is not None and event.status != "starting" else None
    runner = RunnerState(
        runner_id=event.runner_id,
        instance_id=event.instance_id,
        node_id=event.node_id,
        status=event.status,
        error=event.error,
        compute_device=event.compute_device
        or (previous.compute_device if previous is not None else None),
        loaded_bytes=event.loaded_bytes
        if event.loaded_bytes is not None
        else (kept.loaded_bytes if kept is not None else None),
        total_bytes=event.total_bytes
        if event.total_bytes is not None
        else (kept.total_bytes if kept is not None else None),
    )
    return state.model_copy(update={"runners": {**state.runners, event.runner_id: runner}})


# --- heals and moves ----------------------------------------------------------------------
def _without_runners(state: State, runner_ids: set[RunnerId]) -> dict[RunnerId, RunnerState]:
    return {k: v for k, v in state.runners.items() if k not in runner_ids}


def _with_retiring(instance: Instance, kept: list[Shard]) -> Instance:
    """The instance with only ``kept`` of its retiring set (its ring ports freed with the
    last one)."""
    if len(kept) == len(instance.retiring_shards):
        return instance
    endpoints = instance.retiring_ring_endpoints if kept else []
    return instance.model_copy(
        update={"retiring_shards": kept, "retiring_ring_endpoints": endpoints}
    )


def _without_retiring_on(instance: Instance, node_id: NodeId) -> Instance:
    return _with_retiring(
        instance, [shard for shard in instance.retiring_shards if shard.node_id != node_id]
    )


def _fail_tasks(
    tasks: Mapping[TaskId, Task], which: Callable[[Task], bool], error: str
) -> dict[TaskId, Task]:
    return {
        task_id: (
            task.model_copy(update={"status": "failed", "error": error}) if which(task) else task
        )
        for task_id, task in tasks.items()
    }


def _with_change(instance: Instance, change: PlacementChange) -> list[PlacementChange]:
    """The instance's change list with ``change`` recorded (replacing its earlier form)."""
    kept = [known for known in instance.changes if known.change_id != change.change_id]
    return [*kept, change][-CHANGES_KEPT:]


def apply_instance_replacement_started(state: State, event: InstanceReplacementStarted) -> State:
    instance = state.instances.get(event.instance_id)
    if instance is None or instance.incoming is not None:
        return state
    replacement = event.replacement
    updated = instance.model_copy(
        update={"incoming": replacement, "changes": _with_change(instance, replacement.change)}
    )
    return state.model_copy(
        update={"instances": {**state.instances, instance.instance_id: updated}}
    )


def apply_instance_replaced(state: State, event: InstanceReplaced) -> State:
    """The incoming set serves. A sound old set retires (it finishes the requests bound to
    it); a broken one is dropped and its requests that had not started move to the new
    rank 0."""
    instance = state.instances.get(event.instance_id)
    incoming = instance.incoming if instance is not None else None
    if instance is None or incoming is None or incoming.change.change_id != event.change_id:
        return state
    old = instance.shards
    old_zero = rank_zero_runner(old)
    new_zero = rank_zero_runner(incoming.shards)
    broken = set_breakage(state, old) is not None
    tasks = dict(state.tasks)
    if broken and old_zero is not None and new_zero is not None:
        for task_id, task in state.tasks.items():
            if task.status == "pending" and task.runner_id == old_zero:
                tasks[task_id] = task.model_copy(update={"runner_id": new_zero})
    change = incoming.change.model_copy(
        update={"outcome": "switched", "finished_at": event.switched_at}
    )
    retiring = [*instance.retiring_shards, *([] if broken else old)]
    retiring_endpoints = [
        *instance.retiring_ring_endpoints,
        *([] if broken else instance.ring_endpoints),
    ]
    updated = instance.model_copy(
        update={
            "shards": incoming.shards,
            "ring_endpoints": incoming.ring_endpoints,
            "placement": incoming.placement,
            "incoming": None,
            "retiring_shards": retiring,
            "retiring_ring_endpoints": retiring_endpoints,
            "failure": None,
            "changes": _with_change(instance, change),
            "measured_ms_per_token": None,
            "measured_time_to_first_token_ms": None,
            "measured_at": None,
        }
    )
    dropped = {shard.runner_id for shard in old} if broken else set[RunnerId]()
    return state.model_copy(
        update={
            "instances": {**state.instances, instance.instance_id: updated},
            "runners": _without_runners(state, dropped),
            "tasks": tasks,
        }
    )


def apply_instance_replacement_aborted(state: State, event: InstanceReplacementAborted) -> State:
    instance = state.instances.get(event.instance_id)
    incoming = instance.incoming if instance is not None else None
    if instance is None or incoming is None or incoming.change.change_id != event.change_id:
        return state
    change = incoming.change.model_copy(
        update={
            "outcome": "aborted",
            "outcome_reason": event.reason,
            "failed_devices": event.failed_devices,
            "finished_at": event.aborted_at,
        }
    )
    updated = instance.model_copy(
        update={"incoming": None, "changes": _with_change(instance, change)}
    )
    dropped = {shard.runner_id for shard in incoming.shards}
    return state.model_copy(
        update={
            "instances": {**state.instances, instance.instance_id: updated},
            "runners": _without_runners(state, dropped),
        }
    )


def apply_instance_failed(state: State, event: InstanceFailed) -> State:
    instance = state.instances.get(event.instance_id)
    if instance is None:
        return state
    updated = instance.model_copy(update={"failure": event.reason})
    tasks = _fail_tasks(
        state.tasks,
        lambda task: (
            task.instance_id == event.instance_id and task.status in ("pending", "running")
        ),
        f"the instance failed: {event.reason}",
    )
    return state.model_copy(
        update={"instances": {**state.instances, instance.instance_id: updated}, "tasks": tasks}
    )


def apply_task_status_updated(state: State, event: TaskStatusUpdated) -> State:
    task = state.tasks.get(event.task_id)
    if task is None:
        return state
    updated = task.model_copy(update={"status": event.status, "error": event.error})
    tasks = {**state.tasks, event.task_id: updated}
    finished = [task_id for task_id, kept in tasks.items() if kept.status in FINISHED_TASK_STATUSES]
    for task_id in finished[: max(0, len(finished) - FINISHED_TASKS_KEPT)]:
        del tasks[task_id]
    return state.model_copy(update={"tasks": tasks})


def apply_stage_time_measured(state: State, event: StageTimeMeasured) -> State:
    """The shard's measured stage time; on rank 0 the instance's end-to-end times; and the
    device's calibration against the shard's uncalibrated prediction, when it has one."""
    instance = state.instances.get(event.instance_id)
    if instance is None:
        return state
    position = next(
        (i for i, shard in enumerate(instance.shards) if shard.runner_id == event.runner_id),
        None,
    )
    if position is None:
        return state
    shard = instance.shards[position]
    shards = list(instance.shards)
    shards[position] = shard.model_copy(update={"measured_stage_ms": event.stage_ms_per_token})
    instance_update: dict[str, object] = {"shards": shards}
    if shard.rank == 0:
        instance_update["measured_at"] = event.measured_at
        if event.ms_per_token is not None:
            instance_update["measured_ms_per_token"] = event.ms_per_token
        if event.time_to_first_token_ms is not None:
            instance_update["measured_time_to_first_token_ms"] = event.time_to_first_token_ms
    instances = {
        **state.instances,
        instance.instance_id: instance.model_copy(update=instance_update),
    }
    update: dict[str, object] = {"instances": instances}
    if shard.base_stage_ms is not None and shard.base_stage_ms > 0:
        # Keyed by the shard's placed device: that is what placement predicts for.
        devices = state.device_calibration.get(shard.node_id, {})
        calibration = calibrated(
            devices.get(shard.device_id),
            shard.node_id,
            shard.device_id,
            instance.model_id,
            shard.n_layers,
            event.stage_ms_per_token / shard.base_stage_ms,
            event.measured_at,
        )
        update["device_calibration"] = {
            **state.device_calibration,
            shard.node_id: {**devices, shard.device_id: calibration},
        }
    return state.model_copy(update=update)


def calibrated(
    previous: DeviceCalibration | None,
    node_id: NodeId,
    device_id: DeviceId,
    model_id: str,
    n_layers: int,
    factor: float,
    measured_at: datetime,
) -> DeviceCalibration:
    """``previous`` with one more measured factor folded in; afresh when there is none or it
    was measured on another model or layer count."""
    if previous is None or previous.model_id != model_id or previous.n_layers != n_layers:
        return DeviceCalibration(
            node_id=node_id,
            device_id=device_id,
            model_id=model_id,
            n_layers=n_layers,
            factor=factor,
            samples=1,
            measured_at=measured_at,
        )
    weight = CALIBRATION_NEW_SAMPLE_WEIGHT
    return previous.model_copy(
        update={
            "factor": (1 - weight) * previous.factor + weight * factor,
            "samples": previous.samples + 1,
            "measured_at": measured_at,
        }
    )
