"""Pure command handling: (command, state) -> events, or a CommandResult with the error."""

from typing import assert_never

from exo.shared.types.commands import (
    CancelTask,
    Command,
    CommandResult,
    CreateChatTask,
    DeleteInstance,
    PlaceInstance,
)
from exo.shared.types.events import Event, InstanceDeleted
from exo.shared.types.state import State


def handle_command(command: Command, state: State) -> list[Event] | CommandResult:
    match command:
        case PlaceInstance():
            return CommandResult(ok=False, status_code=501, error="placement is not available yet")
        case DeleteInstance():
            if command.instance_id not in state.instances:
                return CommandResult(
                    ok=False, status_code=404, error=f"no instance {command.instance_id}"
                )
            return [InstanceDeleted(instance_id=command.instance_id)]
        case CreateChatTask() | CancelTask():
            return CommandResult(ok=False, status_code=501, error="tasks are not available yet")
        case _:
            assert_never(command)
