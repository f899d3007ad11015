import ast
import inspect
import typing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from exo.shared import apply as apply_module
from exo.shared.apply import EventOutOfOrderError, apply, apply_event
from exo.shared.tests.instances import single_shard_instance
from exo.shared.types.events import (
    DeviceGPUStatesUpdated,
    DeviceGPUStateUpdated,
    Event,
    GPUBandwidthMeasured,
    GPUDeviceInfoReported,
    IndexedEvent,
    InstanceCreated,
    MasterElected,
    NodeInfoReported,
    NodeMemoryUpdated,
    NodeTimedOut,
    RunnerStatusUpdated,
    StageTimeMeasured,
    TaskCreated,
    TaskStatusUpdated,
)
from exo.shared.types.execution import ComputeDevice, ExecutionCapability
from exo.shared.types.gpu import DeviceGPUState, GPUDeviceInfo
from exo.shared.types.ids import CommandId, DeviceId, InstanceId, NodeId, RunnerId, TaskId
from exo.shared.types.instances import Shard
from exo.shared.types.node import NetworkInterface, NodeInfo, NodeStaticInfo
from exo.shared.types.runners import RunnerStatus
from exo.shared.types.state import State
from exo.shared.types.tasks import ChatCompletionParams, Task

NODE_A = NodeId("node-a")
NODE_B = NodeId("node-b")
WHEN = datetime(2026, 1, 1, tzinfo=UTC)


def node_info(node_id: NodeId) -> NodeInfoReported:
    info = NodeStaticInfo(
        friendly_name=f"box-{node_id}", hostname="h", os="Linux", cpu_count=8, ram_total_bytes=1000
    )
    return NodeInfoReported(node_id=node_id, info=info, ram_available_bytes=600, reported_at=WHEN)


def device_state(node_id: NodeId, device: str, used: int, when: datetime = WHEN) -> DeviceGPUState:
    return DeviceGPUState(
        device_id=DeviceId(device),
        node_id=node_id,
        memory_used_bytes=used,
        memory_total_bytes=8000,
        compute_utilization_percent=10,
        last_update=when,
    )


def gpu_reading(
    node_id: NodeId, device: str, used: int, when: datetime = WHEN
) -> DeviceGPUStateUpdated:
    return DeviceGPUStateUpdated(device_state=device_state(node_id, device, used, when))


def apply_all(events: list[Event]) -> State:
    state = State()
    for index, event in enumerate(events):
        state = apply(state, IndexedEvent(idx=index, event=event))
    return state


def test_empty_state_has_no_events() -> None:
    assert State().last_event_applied_idx == -1
    assert State().master_node_id is None


def test_apply_is_pure_and_advances_the_index() -> None:
    state = State()
    new_state = apply(state, IndexedEvent(idx=0, event=MasterElected(master_node_id=NODE_A)))
    assert state.master_node_id is None and state.last_event_applied_idx == -1
    assert new_state.master_node_id == NODE_A and new_state.last_event_applied_idx == 0


def test_apply_rejects_events_out_of_order() -> None:
    with pytest.raises(EventOutOfOrderError, match="expected event index 0, got 1"):
        apply(State(), IndexedEvent(idx=1, event=MasterElected(master_node_id=NODE_A)))


def test_apply_rejects_an_index_already_applied() -> None:
    state = apply_all([MasterElected(master_node_id=NODE_A), node_info(NODE_A)])
    assert state.last_event_applied_idx == 1
    before = state.model_dump()
    # The last index applied again, and an older one: neither may replace what is there.
    for stale_idx in (1, 0):
        stale = IndexedEvent(idx=stale_idx, event=MasterElected(master_node_id=NODE_B))
        with pytest.raises(EventOutOfOrderError):
            apply(state, stale)
        assert state.model_dump() == before
    assert state.master_node_id == NODE_A and state.last_event_applied_idx == 1
    # The state is still at its place in the log: the next index applies to it.
    after = apply(state, IndexedEvent(idx=2, event=MasterElected(master_node_id=NODE_B)))
    assert after.master_node_id == NODE_B and after.last_event_applied_idx == 2
    assert state.model_dump() == before


def test_node_lifecycle() -> None:
    state = apply_all(
        [
            node_info(NODE_A),
            node_info(NODE_B),
            NodeMemoryUpdated(node_id=NODE_A, ram_available_bytes=300, reported_at=WHEN),
            gpu_reading(NODE_A, "cuda:0", 100),
            gpu_reading(NODE_B, "cuda:0", 200),
        ]
    )
    assert set(state.nodes) == {NODE_A, NODE_B}
    assert state.nodes[NODE_A].ram_available_bytes == 300
    # The same device id on two nodes does not collide.
    assert state.gpu_device_state[NODE_A][DeviceId("cuda:0")].memory_used_bytes == 100
    assert state.gpu_device_state[NODE_B][DeviceId("cuda:0")].memory_used_bytes == 200
    state = apply(state, IndexedEvent(idx=5, event=NodeTimedOut(node_id=NODE_A)))
    assert set(state.nodes) == {NODE_B}
    assert NODE_A not in state.gpu_device_state


def h100(device: str = "cuda:0", node: NodeId = NODE_A) -> GPUDeviceInfo:
    return GPUDeviceInfo(
        device_id=DeviceId(device),
        node_id=node,
        name="H100",
        vendor="NVIDIA",
        backend="cuda",
        memory_total_bytes=80,
        memory_bandwidth_gbps=3350,
        peak_tflops_fp16=989,
    )


def link(source: NodeId, dest: NodeId, mbps: float = 900) -> GPUBandwidthMeasured:
    """A node-to-node link measurement."""
    return GPUBandwidthMeasured(
        source_node_id=source,
        dest_node_id=dest,
        source_device_id="node",
        dest_device_id="node",
        bandwidth_mbps=mbps,
        latency_ms=0.4,
        measurement_count=3,
    )


def test_device_info_and_links_are_kept_per_node() -> None:
    state = apply_all(
        [
            node_info(NODE_A),
            node_info(NODE_B),
            GPUDeviceInfoReported(device_info=h100()),
            link(NODE_A, NODE_B),
        ]
    )
    assert state.gpu_device_info[NODE_A][DeviceId("cuda:0")].name == "H100"
    assert state.gpu_links[NODE_A][NODE_B].bandwidth_mbps == 900
    state = apply(state, IndexedEvent(idx=4, event=NodeTimedOut(node_id=NODE_B)))
    assert NODE_B not in state.gpu_links.get(NODE_A, {})


def test_every_event_type_is_handled() -> None:
    """apply_event's match ends in assert_never, so type checking fails on a missing case;
    this checks, from the module's source, that no event kind falls through at run time
    either (read from the source, not from the function's code object, so that a tool that
    wraps the function, as a mutation tester does, changes nothing)."""
    union = typing.get_args(typing.get_args(Event)[0])
    assert len(union) >= 14
    handled = {event_type.__name__ for event_type in union}
    tree = ast.parse(Path(inspect.getfile(apply_module)).read_text())
    matched = {
        node.cls.id
        for node in ast.walk(tree)
        if isinstance(node, ast.MatchClass) and isinstance(node.cls, ast.Name)
    }
    assert handled <= matched, handled - matched


def test_state_round_trips_through_json() -> None:
    state = apply_all([node_info(NODE_A), gpu_reading(NODE_A, "cuda:0", 5)])
    assert State.model_validate_json(state.model_dump_json()) == state


def test_late_reports_from_a_timed_out_node_change_nothing() -> None:
    state = apply_all([node_info(NODE_A), node_info(NODE_B), NodeTimedOut(node_id=NODE_A)])
    late = [
        gpu_reading(NODE_A, "cuda:0", 100),
        GPUBandwidthMeasured(
            source_node_id=NODE_B,
            dest_node_id=NODE_A,
            source_device_id="net",
            dest_device_id="net",
            bandwidth_mbps=1,
            latency_ms=1,
            measurement_count=1,
        ),
    ]
    for offset, event in enumerate(late):
        state = apply(state, IndexedEvent(idx=3 + offset, event=event))
    assert NODE_A not in state.gpu_device_state
    assert state.gpu_links == {}


def test_only_the_most_recent_finished_tasks_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("exo.shared.apply.FINISHED_TASKS_KEPT", 2)
    params = ChatCompletionParams(model="m")
    events: list[Event] = []
    for index in range(4):
        task = Task(
            task_id=TaskId(f"t{index}"),
            command_id=CommandId("c"),
            instance_id=InstanceId("i"),
            requested_by=NODE_A,
            params=params,
        )
        events.append(TaskCreated(task=task))
    events += [
        TaskStatusUpdated(task_id=TaskId(f"t{index}"), status="complete") for index in range(3)
    ]
    state = apply_all(events)
    assert sorted(state.tasks) == ["t1", "t2", "t3"]  # t0 finished first and went; t3 runs
    assert state.tasks[TaskId("t3")].status == "pending"


def test_a_nodes_execution_capability_and_a_runners_device_are_kept() -> None:
    cpu = ComputeDevice(device_id=DeviceId("cpu:0"), backend="cpu", name="x86_64")
    reported = node_info(NODE_A)
    with_capability = reported.model_copy(
        update={
            "info": reported.info.model_copy(
                update={"execution": ExecutionCapability(mlx_version="0.32.4", devices=[cpu])}
            )
        }
    )
    instance = single_shard_instance(node_id=NODE_A, instance_id="i", runner_id="r")

    def runner(status: RunnerStatus, device: ComputeDevice | None) -> RunnerStatusUpdated:
        return RunnerStatusUpdated(
            runner_id=RunnerId("r"),
            instance_id=InstanceId("i"),
            node_id=NODE_A,
            status=status,
            compute_device=device,
        )

    state = apply_all(
        [
            with_capability,
            InstanceCreated(instance=instance),
            runner("loading", None),
            runner("ready", cpu),
            runner("running", None),  # the device is only sent when it changes
        ]
    )
    execution = state.nodes[NODE_A].execution
    assert execution is not None and execution.can_run_on("cpu:0")
    assert state.runners[RunnerId("r")].status == "running"
    assert state.runners[RunnerId("r")].compute_device == cpu


def later(seconds: float) -> datetime:
    return WHEN + timedelta(seconds=seconds)


def pass_of(
    node_id: NodeId, full: list[DeviceGPUState], unchanged: list[str], seconds: float
) -> DeviceGPUStatesUpdated:
    return DeviceGPUStatesUpdated(
        node_id=node_id,
        device_states=full,
        unchanged_device_ids=[DeviceId(device) for device in unchanged],
        sampled_at=later(seconds),
    )


def test_a_pass_replaces_full_readings_and_refreshes_unchanged_ones() -> None:
    state = apply_all(
        [
            node_info(NODE_A),
            gpu_reading(NODE_A, "cuda:0", 100, later(1)),
            gpu_reading(NODE_A, "cuda:1", 200, later(1)),
            pass_of(NODE_A, [device_state(NODE_A, "cuda:1", 700, later(9))], ["cuda:0"], 10),
        ]
    )
    devices = state.gpu_device_state[NODE_A]
    # The unchanged device keeps its values; only its last_update moves.
    assert devices[DeviceId("cuda:0")] == device_state(NODE_A, "cuda:0", 100, later(10))
    assert devices[DeviceId("cuda:1")] == device_state(NODE_A, "cuda:1", 700, later(9))
    assert state.nodes[NODE_A].last_seen == later(10)


def test_an_unchanged_id_needs_a_stored_reading_and_a_newer_time() -> None:
    base = [node_info(NODE_A), gpu_reading(NODE_A, "cuda:0", 100, later(20))]
    state = apply_all([*base, pass_of(NODE_A, [], ["cuda:0", "cuda:9"], 15)])
    # An older sampled_at does not move the reading back, and an id with no reading
    # stored creates nothing.
    assert state.gpu_device_state[NODE_A] == {
        DeviceId("cuda:0"): device_state(NODE_A, "cuda:0", 100, later(20))
    }
    assert state.nodes[NODE_A].last_seen == later(20)


def test_a_pass_moves_last_seen_to_its_newest_time() -> None:
    state = apply_all(
        [
            node_info(NODE_A),
            pass_of(NODE_A, [device_state(NODE_A, "cuda:0", 1, later(30))], [], 25),
        ]
    )
    assert state.nodes[NODE_A].last_seen == later(30)
    state = apply(state, IndexedEvent(idx=2, event=pass_of(NODE_A, [], ["cuda:0"], 40)))
    assert state.nodes[NODE_A].last_seen == later(40)
    assert state.gpu_device_state[NODE_A][DeviceId("cuda:0")].last_update == later(40)


def test_a_single_reading_and_a_pass_of_it_apply_alike() -> None:
    reading = device_state(NODE_A, "cuda:0", 300, later(5))
    single = apply_all([node_info(NODE_A), DeviceGPUStateUpdated(device_state=reading)])
    as_pass = apply_all([node_info(NODE_A), pass_of(NODE_A, [reading], [], 5)])
    assert single.model_dump() == as_pass.model_dump()


def test_a_pass_of_a_node_not_in_the_state_is_ignored() -> None:
    state = apply_all([node_info(NODE_B)])
    after = apply_event(state, pass_of(NODE_A, [device_state(NODE_A, "cuda:0", 1)], ["cuda:1"], 5))
    assert after == state


def test_a_pass_carries_only_its_own_nodes_readings() -> None:
    with pytest.raises(ValueError, match="another node"):
        pass_of(NODE_A, [device_state(NODE_B, "cuda:0", 1)], [], 5)


def test_a_node_report_is_stored_whole_and_a_memory_update_moves_only_ram_and_last_seen() -> None:
    static = NodeStaticInfo(
        friendly_name="box-a",
        hostname="a.local",
        os="Darwin",
        cpu_count=12,
        ram_total_bytes=64_000,
        network_interfaces=[NetworkInterface(name="en0", addresses=["10.0.0.2"])],
        api_port=52415,
        ring_port=6000,
    )
    reported = NodeInfoReported(
        node_id=NODE_A, info=static, ram_available_bytes=40_000, reported_at=later(1)
    )
    state = apply_all([reported])
    expected = NodeInfo(
        node_id=NODE_A,
        friendly_name="box-a",
        hostname="a.local",
        os="Darwin",
        cpu_count=12,
        ram_total_bytes=64_000,
        ram_available_bytes=40_000,
        network_interfaces=[NetworkInterface(name="en0", addresses=["10.0.0.2"])],
        api_port=52415,
        ring_port=6000,
        last_seen=later(1),
    )
    assert state.nodes == {NODE_A: expected}
    update = NodeMemoryUpdated(node_id=NODE_A, ram_available_bytes=100, reported_at=later(7))
    state = apply(state, IndexedEvent(idx=1, event=update))
    assert state.nodes == {
        NODE_A: expected.model_copy(update={"ram_available_bytes": 100, "last_seen": later(7)})
    }
    # A memory update of a node the state does not know creates nothing.
    unknown = NodeMemoryUpdated(node_id=NODE_B, ram_available_bytes=1, reported_at=later(8))
    assert apply_event(state, unknown) == state


def test_a_nodes_second_device_and_second_link_are_added_to_its_first() -> None:
    node_c = NodeId("node-c")
    state = apply_all(
        [
            node_info(NODE_A),
            node_info(NODE_B),
            node_info(node_c),
            GPUDeviceInfoReported(device_info=h100("cuda:0")),
            GPUDeviceInfoReported(device_info=h100("cuda:1")),
            link(NODE_A, NODE_B, 900),
            link(NODE_A, node_c, 400),
        ]
    )
    assert state.gpu_device_info == {
        NODE_A: {DeviceId("cuda:0"): h100("cuda:0"), DeviceId("cuda:1"): h100("cuda:1")}
    }
    assert {dest: each.bandwidth_mbps for dest, each in state.gpu_links[NODE_A].items()} == {
        NODE_B: 900,
        node_c: 400,
    }


def test_a_small_uncalibrated_prediction_still_calibrates_the_device() -> None:
    shard = Shard(
        runner_id=RunnerId("r"),
        node_id=NODE_A,
        device_id=DeviceId("cuda:0"),
        rank=0,
        world_size=1,
        start_layer=0,
        end_layer=4,
        predicted_stage_ms=0.5,
        base_stage_ms=0.5,
    )
    instance = single_shard_instance(node_id=NODE_A, instance_id="i").model_copy(
        update={"shards": [shard]}
    )
    measured = StageTimeMeasured(
        instance_id=InstanceId("i"),
        runner_id=RunnerId("r"),
        node_id=NODE_A,
        device_id=DeviceId("cuda:0"),
        stage_ms_per_token=1.5,
        tokens=4,
        measured_at=WHEN,
    )
    state = apply_all([node_info(NODE_A), InstanceCreated(instance=instance), measured])
    calibration = state.device_calibration[NODE_A][DeviceId("cuda:0")]
    assert (calibration.factor, calibration.samples) == (3.0, 1)  # 1.5 ms measured / 0.5 predicted
