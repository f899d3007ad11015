"""Commands: intents sent from an API to the master, which turns them into events."""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from exo.shared.types.ids import CommandId, InstanceId, NodeId, TaskId, new_command_id
from exo.shared.types.instances import PlacementObjective, RebalancePolicy
from exo.shared.types.tasks import ChatCompletionParams


class BaseCommand(BaseModel):
    model_config = ConfigDict(frozen=True)

    command_id: CommandId = Field(default_factory=new_command_id)


class PlaceInstance(BaseCommand):
    kind: Literal["PlaceInstance"] = "PlaceInstance"
    model_id: str = Field(min_length=1)
    min_nodes: int = Field(default=1, ge=1)
    objective: PlacementObjective = "latency"
    rebalance: RebalancePolicy = "auto"
    allow_planning_only: bool = False
    """Place a planning-only card (no weights: its runners fail at once) instead of
    refusing it; for placement experiments and tests."""


class ReplaceInstance(BaseCommand):
    """Decide the instance's placement afresh now and move it there if it differs (make
    before break; no margin, no hourly limit)."""

    kind: Literal["ReplaceInstance"] = "ReplaceInstance"
    instance_id: InstanceId


class DeleteInstance(BaseCommand):
    kind: Literal["DeleteInstance"] = "DeleteInstance"
    instance_id: InstanceId


class CreateChatTask(BaseCommand):
    kind: Literal["CreateChatTask"] = "CreateChatTask"
    task_id: TaskId
    requested_by: NodeId
    params: ChatCompletionParams


class CancelTask(BaseCommand):
    kind: Literal["CancelTask"] = "CancelTask"
    task_id: TaskId


Command = Annotated[
    PlaceInstance | ReplaceInstance | DeleteInstance | CreateChatTask | CancelTask,
    Field(discriminator="kind"),
]

CommandAdapter: TypeAdapter[Command] = TypeAdapter(Command)


class CommandResult(BaseModel):
    """The master's answer to a command: the indices of the events it produced, or an error
    with the HTTP status an API should report."""

    model_config = ConfigDict(frozen=True)

    ok: bool
    event_indices: list[int] = Field(default_factory=list)
    term: int = 0
    """The master's term when it indexed them: the write stands once the events at those
    indices are committed with this term."""
    status_code: int = 200
    error: str | None = None
    detail: dict[str, object] = Field(default_factory=dict)
