"""Pure command handling: (command, state) -> events, or a CommandResult with the error."""

import ipaddress
from typing import assert_never

from exo.master.placement import PlacementError, place_instance
from exo.models.cards import get_model_card, known_model_cards, unavailable_reason
from exo.shared.types.commands import (
    CancelTask,
    Command,
    CommandResult,
    CreateChatTask,
    DeleteInstance,
    PlaceInstance,
)
from exo.shared.types.events import (
    Event,
    InstanceCreated,
    InstanceDeleted,
    TaskCreated,
    TaskStatusUpdated,
)
from exo.shared.types.ids import InstanceId, NodeId
from exo.shared.types.instances import Instance
from exo.shared.types.state import State
from exo.shared.types.tasks import Task

RING_BASE_PORT = 52500
"""Runner ranks listen for the MLX ring backend on ports from here up, one per rank,
never reusing a port another instance in the cluster holds."""


def handle_command(command: Command, state: State) -> list[Event] | CommandResult:
    match command:
        case PlaceInstance():
            outcome = plan_instance(command, state)
            if isinstance(outcome, CommandResult):
                return outcome
            return [InstanceCreated(instance=outcome)]
        case DeleteInstance():
            if command.instance_id not in state.instances:
                return CommandResult(
                    ok=False, status_code=404, error=f"no instance {command.instance_id}"
                )
            return [InstanceDeleted(instance_id=command.instance_id)]
        case CreateChatTask():
            return create_chat_task(command, state)
        case CancelTask():
            task = state.tasks.get(command.task_id)
            if task is None:
                return CommandResult(ok=False, status_code=404, error=f"no task {command.task_id}")
            if task.status in ("complete", "failed", "cancelled"):
                return []
            return [TaskStatusUpdated(task_id=task.task_id, status="cancelled")]
        case _:
            assert_never(command)


def instance_health(state: State, instance: Instance) -> tuple[str, str | None]:
    """("ready" | "failed" | "loading", explanation) from the instance's runners."""
    statuses: list[str] = []
    for shard in instance.shards:
        runner = state.runners.get(shard.runner_id)
        if runner is not None and runner.status == "failed":
            return "failed", f"runner {shard.runner_id} (rank {shard.rank}) failed: {runner.error}"
        statuses.append(runner.status if runner is not None else "starting")
    if all(status in ("ready", "running") for status in statuses):
        return "ready", None
    return "loading", "runners are " + ", ".join(
        f"rank {rank}: {status}" for rank, status in enumerate(statuses)
    )


def instances_for_model(state: State, model: str) -> list[Instance]:
    card = get_model_card(model)
    model_id = card.model_id if card is not None else model
    return [instance for instance in state.instances.values() if instance.model_id == model_id]


def create_chat_task(command: CreateChatTask, state: State) -> list[Event] | CommandResult:
    """Assign the task to the least busy ready instance serving the model."""
    candidates = instances_for_model(state, command.params.model)
    if not candidates:
        return CommandResult(
            ok=False,
            status_code=404,
            error=f"no instance serves model '{command.params.model}'; "
            f'create one with POST /instance {{"model_id": "{command.params.model}"}}',
        )
    health = {instance.instance_id: instance_health(state, instance) for instance in candidates}
    ready = [instance for instance in candidates if health[instance.instance_id][0] == "ready"]
    if not ready:
        status, why = health[candidates[0].instance_id]
        return CommandResult(
            ok=False,
            status_code=503,
            error=f"the instance for '{command.params.model}' is not ready ({status}): {why}",
            detail={"instance_status": status},
        )

    def load(instance: Instance) -> tuple[int, str]:
        busy = sum(
            1
            for task in state.tasks.values()
            if task.instance_id == instance.instance_id and task.status in ("pending", "running")
        )
        return busy, instance.instance_id

    chosen = min(ready, key=load)
    task = Task(
        task_id=command.task_id,
        command_id=command.command_id,
        instance_id=chosen.instance_id,
        requested_by=command.requested_by,
        params=command.params,
    )
    return [TaskCreated(task=task)]


def plan_instance(
    command: PlaceInstance, state: State, instance_id: InstanceId | None = None
) -> Instance | CommandResult:
    """Placement plus ring endpoints; also used for dry runs by the API."""
    card = get_model_card(command.model_id)
    if card is None and (reason := unavailable_reason(command.model_id)) is not None:
        return CommandResult(
            ok=False,
            status_code=503,
            error=f"'{command.model_id}' cannot be placed from this node now: {reason}",
        )
    if card is None:
        known = ", ".join(sorted(known_model_cards()))
        return CommandResult(
            ok=False,
            status_code=404,
            error=f"unknown model '{command.model_id}'; known models: {known}",
            detail={"known_models": sorted(known_model_cards())},
        )
    try:
        instance = place_instance(command, state, card, instance_id=instance_id)
    except PlacementError as error:
        return CommandResult(
            ok=False, status_code=error.status_code, error=error.message, detail=error.detail
        )
    return instance.model_copy(update={"ring_endpoints": ring_endpoints(instance, state)})


def ring_endpoints(instance: Instance, state: State) -> list[str]:
    """host:port for each rank, in rank order."""
    used_ports = {
        int(endpoint.rsplit(":", 1)[1])
        for other in state.instances.values()
        for endpoint in other.ring_endpoints
    }
    shard_nodes = [shard.node_id for shard in sorted(instance.shards, key=lambda s: s.rank)]
    hostnames = {state.nodes[node].hostname for node in shard_nodes if node in state.nodes}
    same_machine = len(set(shard_nodes)) == 1 or len(hostnames) == 1
    endpoints: list[str] = []
    port = RING_BASE_PORT
    for node_id in shard_nodes:
        while port in used_ports:
            port += 1
        host = "127.0.0.1" if same_machine else node_address(state, node_id)
        endpoints.append(f"{host}:{port}")
        used_ports.add(port)
    return endpoints


def node_address(state: State, node_id: NodeId) -> str:
    """The node's first routable IPv4 address, else loopback."""
    node = state.nodes.get(node_id)
    if node is not None:
        for interface in node.network_interfaces:
            for address in interface.addresses:
                try:
                    parsed = ipaddress.ip_address(address)
                except ValueError:
                    continue
                if parsed.version == 4 and not parsed.is_loopback and not parsed.is_link_local:
                    return address
    return "127.0.0.1"
