"""An instance ready to run: its placement on the cluster plus the ring endpoints its ranks
listen on. Used for new instances, dry runs, heals and moves."""

import ipaddress
from collections.abc import Mapping

from exo.master.placement import PlacementError, place_instance
from exo.models.cards import get_model_card, known_model_cards, unavailable_reason
from exo.shared.echo import echoed
from exo.shared.types.commands import CommandResult, PlaceInstance
from exo.shared.types.ids import DeviceId, InstanceId, NodeId
from exo.shared.types.instances import Instance
from exo.shared.types.state import State

RING_BASE_PORT = 18500
"""Runner ranks listen for the MLX ring backend on ports from here up, one per rank,
never reusing a port a set of an instance in the cluster holds. Below every system's
ephemeral range (Linux 32768+, macOS and Windows 49152+), so no outgoing connection and no
port the OS hands out holds one (a rank once joined another program's ring there). A node
started with ``--ring-port`` says where its own ranks' ports start instead."""
RING_PORTS_PER_NODE = 1000
"""How many ports above its ``--ring-port`` a node must leave for its ranks."""


def plan_instance(
    command: PlaceInstance,
    state: State,
    instance_id: InstanceId | None = None,
    excluded: Mapping[tuple[NodeId, DeviceId], str] | None = None,
    log_level: str = "INFO",
) -> Instance | CommandResult:
    """Placement plus ring endpoints, or the error as a command result (dry runs, new
    instances, heals and moves)."""
    card = get_model_card(command.model_id)
    if card is None and (reason := unavailable_reason(command.model_id)) is not None:
        return CommandResult(
            ok=False,
            status_code=503,
            error=f"'{echoed(command.model_id)}' cannot be placed from this node now: {reason}",
        )
    if card is None:
        known = ", ".join(sorted(known_model_cards()))
        return CommandResult(
            ok=False,
            status_code=404,
            error=f"unknown model '{echoed(command.model_id)}'; known models: {known}",
            detail={"known_models": sorted(known_model_cards())},
        )
    try:
        instance = place_instance(
            command,
            state,
            card,
            instance_id=instance_id,
            excluded=excluded,
            log_level=log_level,
        )
    except PlacementError as error:
        return CommandResult(
            ok=False, status_code=error.status_code, error=error.message, detail=error.detail
        )
    return instance.model_copy(update={"ring_endpoints": ring_endpoints(instance, state)})


def ring_endpoints(instance: Instance, state: State) -> list[str]:
    """host:port for each rank, in rank order: the first port from the rank's node's own
    ring port up that no set of an instance in the cluster holds (nor an earlier rank)."""
    used_ports = {
        int(endpoint.rsplit(":", 1)[1])
        for other in state.instances.values()
        for endpoint in other.all_ring_endpoints()
    }
    shard_nodes = [shard.node_id for shard in sorted(instance.shards, key=lambda s: s.rank)]
    hostnames = {state.nodes[node].hostname for node in shard_nodes if node in state.nodes}
    same_machine = len(set(shard_nodes)) == 1 or len(hostnames) == 1
    endpoints: list[str] = []
    for node_id in shard_nodes:
        node = state.nodes.get(node_id)
        port = RING_BASE_PORT if node is None or node.ring_port is None else node.ring_port
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
