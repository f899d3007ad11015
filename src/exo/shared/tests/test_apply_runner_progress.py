"""A runner's load progress in the state: each report replaces it, a status without one
keeps the last known values, a fresh start forgets them."""

from exo.shared.apply import apply_event
from exo.shared.tests.instances import single_shard_instance
from exo.shared.types.events import InstanceCreated, RunnerStatusUpdated
from exo.shared.types.ids import InstanceId, NodeId, RunnerId
from exo.shared.types.runners import RunnerStatus
from exo.shared.types.state import State


def status(
    value: RunnerStatus, loaded: int | None = None, total: int | None = None
) -> RunnerStatusUpdated:
    return RunnerStatusUpdated(
        runner_id=RunnerId("r"),
        instance_id=InstanceId("i"),
        node_id=NodeId("a"),
        status=value,
        loaded_bytes=loaded,
        total_bytes=total,
    )


def test_load_progress_is_kept_until_a_fresh_start() -> None:
    state = apply_event(
        State(),
        InstanceCreated(
            instance=single_shard_instance(node_id="a", instance_id="i", runner_id="r")
        ),
    )
    seen: list[tuple[str, int | None, int | None]] = []
    for event in [
        status("loading"),
        status("loading", 0, 1000),
        status("loading", 400, 1000),
        status("loading", 1000, 1000),
        status("ready"),
        status("running"),
        status("starting"),
        status("loading", 10, 2000),
    ]:
        state = apply_event(state, event)
        runner = state.runners[RunnerId("r")]
        seen.append((runner.status, runner.loaded_bytes, runner.total_bytes))
    assert seen == [
        ("loading", None, None),
        ("loading", 0, 1000),
        ("loading", 400, 1000),
        ("loading", 1000, 1000),
        ("ready", 1000, 1000),
        ("running", 1000, 1000),
        ("starting", None, None),
        ("loading", 10, 2000),
    ]


def test_progress_survives_the_json_of_the_state() -> None:
    state = apply_event(
        State(),
        InstanceCreated(
            instance=single_shard_instance(node_id="a", instance_id="i", runner_id="r")
        ),
    )
    state = apply_event(state, status("loading", 5, 9))
    dumped = state.model_dump(mode="json")["runners"]["r"]
    assert (dumped["loaded_bytes"], dumped["total_bytes"]) == (5, 9)
    assert State.model_validate_json(state.model_dump_json()) == state
