"""Pure command handling: (command, state) -> events, or a CommandResult with the error."""

from typing import assert_never

from exo.master.planning import plan_instance
from exo.master.replacement import manual_replacement
from exo.models.cards import get_model_card
from exo.shared.echo import echoed
from exo.shared.runner_sets import instance_health
from exo.shared.types.commands import (
    CancelTask,
    Command,
    CommandResult,
    CreateChatTask,
    DeleteInstance,
    PlaceInstance,
    ReplaceInstance,
)
from exo.shared.types.events import (
    Event,
    InstanceCreated,
    InstanceDeleted,
    TaskCreated,
    TaskStatusUpdated,
)
from exo.shared.types.instances import Instance, rank_zero_runner
from exo.shared.types.state import State
from exo.shared.types.tasks import Task


def handle_command(command: Command, state: State) -> list[Event] | CommandResult:
    match command:
        case PlaceInstance():
            refusal = planning_only_refusal(command)
            if refusal is not None:
                return refusal
            outcome = plan_instance(command, state)
            if isinstance(outcome, CommandResult):
                return outcome
            return [InstanceCreated(instance=outcome)]
        case ReplaceInstance():
            instance = state.instances.get(command.instance_id)
            if instance is None:
                return CommandResult(
                    ok=False, status_code=404, error=f"no instance {echoed(command.instance_id)}"
                )
            return manual_replacement(instance, state)
        case DeleteInstance():
            if command.instance_id not in state.instances:
                return CommandResult(
                    ok=False, status_code=404, error=f"no instance {echoed(command.instance_id)}"
                )
            return [InstanceDeleted(instance_id=command.instance_id)]
        case CreateChatTask():
            return create_chat_task(command, state)
        case CancelTask():
            task = state.tasks.get(command.task_id)
            if task is None:
                return CommandResult(
                    ok=False, status_code=404, error=f"no task {echoed(command.task_id)}"
                )
            if task.status in ("complete", "failed", "cancelled"):
                return []
            return [TaskStatusUpdated(task_id=task.task_id, status="cancelled")]
        case _:
            assert_never(command)


def planning_only_refusal(command: PlaceInstance) -> CommandResult | None:
    """A 422 for a card that is for planning only (exo knows its sizes, not its weights),
    unless the command allows it; its dry run (``GET /instance/placement``) still works."""
    card = get_model_card(command.model_id)
    if card is None or card.source != "planning_only" or command.allow_planning_only:
        return None
    return CommandResult(
        ok=False,
        status_code=422,
        error=(
            f"'{card.model_id}' is a planning-only card: exo knows its sizes, for "
            "GET /instance/placement, but has no weights to run it. To run it, put the "
            "model's MLX weights (e.g. from mlx-community on Hugging Face, or converted "
            "with mlx_lm.convert) in a directory under --models-dir on every node that "
            "would hold a shard, and place that model id"
        ),
        detail={"model_id": card.model_id, "source": card.source},
    )


def instances_for_model(state: State, model: str) -> list[Instance]:
    card = get_model_card(model)
    model_id = card.model_id if card is not None else model
    return [instance for instance in state.instances.values() if instance.model_id == model_id]


def create_chat_task(command: CreateChatTask, state: State) -> list[Event] | CommandResult:
    """Assign the task to the least busy ready instance serving the model."""
    candidates = instances_for_model(state, command.params.model)
    model = echoed(command.params.model)
    if not candidates:
        return CommandResult(
            ok=False,
            status_code=404,
            error=f"no instance serves model '{model}'; "
            f'create one with POST /instance {{"model_id": "{model}"}}',
        )
    health = {instance.instance_id: instance_health(state, instance) for instance in candidates}
    ready = [instance for instance in candidates if health[instance.instance_id][0] == "ready"]
    if not ready:
        status, why = health[candidates[0].instance_id]
        return CommandResult(
            ok=False,
            status_code=503,
            error=f"the instance for '{model}' is not ready ({status}): {why}",
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
        runner_id=rank_zero_runner(chosen.shards),
        requested_by=command.requested_by,
        params=command.params,
    )
    return [TaskCreated(task=task)]
