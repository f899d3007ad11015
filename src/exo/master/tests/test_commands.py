from datetime import UTC, datetime

from exo.master.commands import handle_command
from exo.master.planning import RING_BASE_PORT, ring_endpoints
from exo.shared.tests.instances import GREEDY
from exo.shared.types.commands import (
    CancelTask,
    CommandResult,
    CreateChatTask,
    DeleteInstance,
    PlaceInstance,
)
from exo.shared.types.events import InstanceCreated, TaskCreated, TaskStatusUpdated
from exo.shared.types.ids import CommandId, DeviceId, InstanceId, NodeId, RunnerId, TaskId
from exo.shared.types.instances import Instance, Shard
from exo.shared.types.node import NodeInfo
from exo.shared.types.runners import RunnerState, RunnerStatus
from exo.shared.types.state import State
from exo.shared.types.tasks import ChatCompletionParams, Task

NODE = NodeId("node-a")
MODEL = "SmolLM2-135M-Instruct"
DECISION = GREEDY


def node_state() -> State:
    node = NodeInfo(
        node_id=NODE,
        friendly_name="a",
        hostname="host-a",
        ram_total_bytes=16 * 1024**3,
        ram_available_bytes=12 * 1024**3,
        last_seen=datetime(2026, 1, 1, tzinfo=UTC),
    )
    return State(nodes={NODE: node})


def instance(instance_id: str, ports: list[int]) -> Instance:
    shard = Shard(
        runner_id=RunnerId(f"runner-{instance_id}"),
        node_id=NODE,
        device_id=DeviceId("cpu:0"),
        rank=0,
        world_size=1,
        start_layer=0,
        end_layer=30,
    )
    return Instance(
        instance_id=InstanceId(instance_id),
        model_id=MODEL,
        shards=[shard],
        placement=DECISION,
        ring_endpoints=[f"127.0.0.1:{port}" for port in ports],
    )


def with_instances(state: State, *instances: Instance, status: RunnerStatus = "ready") -> State:
    runners = {
        shard.runner_id: RunnerState(
            runner_id=shard.runner_id, instance_id=item.instance_id, node_id=NODE, status=status
        )
        for item in instances
        for shard in item.shards
    }
    return state.model_copy(
        update={"instances": {item.instance_id: item for item in instances}, "runners": runners}
    )


def chat(task_id: str = "t") -> CreateChatTask:
    params = ChatCompletionParams(model=MODEL)
    return CreateChatTask(task_id=TaskId(task_id), requested_by=NODE, params=params)


def test_place_instance_creates_an_instance_with_a_free_ring_port() -> None:
    state = with_instances(node_state(), instance("old", [RING_BASE_PORT]))
    events = handle_command(PlaceInstance(model_id=MODEL), state)
    assert isinstance(events, list)
    (created,) = events
    assert isinstance(created, InstanceCreated)
    assert created.instance.ring_endpoints == [f"127.0.0.1:{RING_BASE_PORT + 1}"]


def test_ring_ports_never_collide_with_other_instances() -> None:
    state = with_instances(node_state(), instance("a", [RING_BASE_PORT, RING_BASE_PORT + 2]))
    two_ranks = instance("b", []).model_copy(
        update={"shards": [*instance("b", []).shards, instance("c", []).shards[0]]}
    )
    assert ring_endpoints(two_ranks, state) == [
        f"127.0.0.1:{RING_BASE_PORT + 1}",
        f"127.0.0.1:{RING_BASE_PORT + 3}",
    ]


def test_each_rank_takes_its_ring_port_from_its_own_node() -> None:
    """A node started with --ring-port says where its ranks' ports start; a node that did
    not say gets the default. Ports held by another instance are still skipped."""
    other = NodeId("node-b")
    base = node_state()
    state = base.model_copy(
        update={
            "nodes": {
                NODE: base.nodes[NODE].model_copy(update={"ring_port": 19000}),
                other: base.nodes[NODE].model_copy(update={"node_id": other}),
            }
        }
    )
    state = with_instances(state, instance("a", [19000]))
    first = instance("b", []).shards[0]
    second = first.model_copy(update={"node_id": other, "rank": 1, "runner_id": RunnerId("r2")})
    two_ranks = instance("b", []).model_copy(update={"shards": [first, second]})
    assert ring_endpoints(two_ranks, state) == ["127.0.0.1:19001", f"127.0.0.1:{RING_BASE_PORT}"]


def test_unknown_model_and_unknown_instance_are_404() -> None:
    unknown = handle_command(PlaceInstance(model_id="nope"), node_state())
    assert isinstance(unknown, CommandResult) and unknown.status_code == 404
    assert MODEL in (unknown.error or "")
    missing = handle_command(DeleteInstance(instance_id=InstanceId("x")), node_state())
    assert isinstance(missing, CommandResult) and missing.status_code == 404


def test_chat_task_needs_a_ready_instance() -> None:
    none = handle_command(chat(), node_state())
    assert isinstance(none, CommandResult) and none.status_code == 404
    assert "POST /instance" in (none.error or "")
    loading = handle_command(
        chat(), with_instances(node_state(), instance("a", [RING_BASE_PORT]), status="loading")
    )
    assert isinstance(loading, CommandResult) and loading.status_code == 503
    failed = handle_command(
        chat(), with_instances(node_state(), instance("a", [RING_BASE_PORT]), status="failed")
    )
    assert isinstance(failed, CommandResult) and failed.status_code == 503
    assert "failed" in (failed.error or "")


def test_chat_task_goes_to_the_least_busy_instance() -> None:
    busy, idle = instance("busy", [RING_BASE_PORT]), instance("idle", [RING_BASE_PORT + 1])
    state = with_instances(node_state(), busy, idle)
    params = chat().params
    running = Task(
        task_id=TaskId("old"),
        command_id=CommandId("c"),
        instance_id=busy.instance_id,
        requested_by=NODE,
        params=params,
        status="running",
    )
    state = state.model_copy(update={"tasks": {running.task_id: running}})
    events = handle_command(chat("new"), state)
    assert isinstance(events, list)
    (created,) = events
    assert isinstance(created, TaskCreated) and created.task.instance_id == idle.instance_id


def test_cancel_only_open_tasks() -> None:
    params = chat().params
    task = Task(
        task_id=TaskId("t"),
        command_id=CommandId("c"),
        instance_id=InstanceId("i"),
        requested_by=NODE,
        params=params,
    )
    state = node_state().model_copy(update={"tasks": {task.task_id: task}})
    events = handle_command(CancelTask(task_id=task.task_id), state)
    assert isinstance(events, list) and len(events) == 1
    (cancel,) = events
    assert isinstance(cancel, TaskStatusUpdated)
    assert cancel.task_id == task.task_id and cancel.status == "cancelled"
    done = state.model_copy(
        update={"tasks": {task.task_id: task.model_copy(update={"status": "complete"})}}
    )
    assert handle_command(CancelTask(task_id=task.task_id), done) == []


def test_a_planning_only_card_is_refused_unless_allowed() -> None:
    state = node_state()
    refused = handle_command(PlaceInstance(model_id="Llama-3.1-8B-Instruct-4bit"), state)
    assert isinstance(refused, CommandResult) and refused.status_code == 422
    assert refused.error is not None
    assert "planning-only" in refused.error and "--models-dir" in refused.error
    allowed = handle_command(
        PlaceInstance(model_id="Llama-3.1-8B-Instruct-4bit", allow_planning_only=True), state
    )
    assert isinstance(allowed, list)  # placed (its runners would then fail: no weights)
