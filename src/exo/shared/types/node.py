"""What a node tells the cluster about itself."""

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from exo.shared.types.execution import ExecutionCapability


class NetworkInterface(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    addresses: list[str] = Field(default_factory=list)


class NodeStaticInfo(BaseModel):
    """Facts that do not change while the node runs; reported once."""

    model_config = ConfigDict(frozen=True)

    friendly_name: str
    hostname: str
    os: str
    cpu_count: int
    ram_total_bytes: int
    network_interfaces: list[NetworkInterface] = Field(default_factory=list)
    api_port: int | None = None
    ring_port: int | None = None
    """The first port this node's runner ranks may listen on for the MLX ring (one port
    per rank from there up); None from a node that did not say: the default."""
    execution: ExecutionCapability | None = None
    """What MLX on the node can compute on; None from a node that did not say."""


class NodeInfo(BaseModel):
    """A node as it appears in ``State.nodes``."""

    model_config = ConfigDict(frozen=True)

    node_id: str
    friendly_name: str
    hostname: str = ""
    os: str = ""
    cpu_count: int = 0
    ram_total_bytes: int = 0
    ram_available_bytes: int = 0
    network_interfaces: list[NetworkInterface] = Field(default_factory=list)
    api_port: int | None = None
    ring_port: int | None = None
    execution: ExecutionCapability | None = None
    last_seen: datetime
