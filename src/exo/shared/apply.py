"""The only way state changes: ``apply(state, indexed_event) -> State``, a pure function.

Times stored in state come from the events themselves, never from the clock at apply
time, so every node that applies the same log holds the same state.

Dispatch is a ``match`` over the event union ending in ``assert_never``, so an event type
that is added to the union without a handler fails type checking.
"""

from collections.abc import Mapping
from datetime import datetime
from typing import TypeVar, assert_never

from loguru import logger

from exo.shared.types.calibration import DeviceCalibration
from exo.shared.types.events import (
    ChunkGenerated,
    DeviceGPUStateUpdated,
    Event,
    EventElided,
    GPUBandwidthMeasured,
    GPUDeviceInfoReported,
    IndexedEvent,
    InstanceCreated,
    InstanceDeleted,
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
from exo.shared.types.gpu import GPULink
from exo.shared.types.ids import DeviceId, NodeId
from exo.shared.types.node import NodeInfo
from exo.shared.types.runners import RunnerState
from exo.shared.types.state import State

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
        case GPUBandwidthMeasured():
            return apply_gpu_bandwidth_measured(state, event)
        case InstanceCreated():
            instances = {**state.instances, event.instance.instance_id: event.instance}
            return state.model_copy(update={"instances": instances})
        case InstanceDeleted():
            return apply_instance_deleted(state, event)
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
    return state.model_copy(
        update={
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
    node = state.nodes.get(reading.node_id)
    if node is None:
        return state  # a late reading from a node that timed out
    devices = {**state.gpu_device_state.get(reading.node_id, {}), reading.device_id: reading}
    gpu_device_state = {**state.gpu_device_state, reading.node_id: devices}
    nodes = state.nodes
    if reading.last_update > node.last_seen:
        nodes = {
            **nodes,
            reading.node_id: node.model_copy(update={"last_seen": reading.last_update}),
        }
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
    if event.instance_id not in state.instances:
        return state
    previous = state.runners.get(event.runner_id)
    runner = RunnerState(
        runner_id=event.runner_id,
        instance_id=event.instance_id,
        node_id=event.node_id,
        status=event.status,
        error=event.error,
        compute_device=event.compute_device
        or (previous.compute_device if previous is not None else None),
    )
    return state.model_copy(update={"runners": {**state.runners, event.runner_id: runner}})


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
