"""Measured stage times: per shard, per instance (rank 0) and per device (calibration)."""

from datetime import UTC, datetime, timedelta

import pytest

from exo.shared.apply import apply, apply_event
from exo.shared.tests.instances import GREEDY
from exo.shared.types.events import (
    EventAdapter,
    IndexedEvent,
    InstanceCreated,
    InstanceDeleted,
    NodeTimedOut,
    StageTimeMeasured,
)
from exo.shared.types.ids import DeviceId, InstanceId, NodeId, RunnerId
from exo.shared.types.instances import Instance, Shard
from exo.shared.types.state import State

NODE_A = NodeId("node-a")
NODE_B = NodeId("node-b")
GPU = DeviceId("cuda:0")
WHEN = datetime(2026, 1, 1, tzinfo=UTC)


def two_stage_instance(
    instance_id: str = "i",
    model_id: str = "m",
    base_stage_ms: tuple[float | None, float | None] = (10.0, 20.0),
    layers: tuple[int, int] = (10, 30),
) -> Instance:
    """Rank 0 (runner r0) on node A, rank 1 (runner r1) on node B, both on their cuda:0."""
    shards = [
        Shard(
            runner_id=RunnerId(f"r{rank}"),
            node_id=node,
            device_id=GPU,
            rank=rank,
            world_size=2,
            start_layer=start,
            end_layer=end,
            predicted_stage_ms=base,
            base_stage_ms=base,
        )
        for rank, node, (start, end), base in zip(
            (0, 1),
            (NODE_A, NODE_B),
            ((0, layers[0]), (layers[0], layers[1])),
            base_stage_ms,
            strict=True,
        )
    ]
    return Instance(
        instance_id=InstanceId(instance_id), model_id=model_id, shards=shards, placement=GREEDY
    )


def measured(
    runner: str,
    stage_ms: float,
    instance_id: str = "i",
    ms_per_token: float | None = None,
    first_token_ms: float | None = None,
    at: datetime = WHEN,
) -> StageTimeMeasured:
    node = NODE_A if runner == "r0" else NODE_B
    return StageTimeMeasured(
        instance_id=InstanceId(instance_id),
        runner_id=RunnerId(runner),
        node_id=node,
        device_id=GPU,
        stage_ms_per_token=stage_ms,
        ms_per_token=ms_per_token,
        time_to_first_token_ms=first_token_ms,
        tokens=12,
        measured_at=at,
    )


def with_instance(instance: Instance) -> State:
    return apply_event(State(), InstanceCreated(instance=instance))


def test_rank_zero_sets_its_stage_and_the_instances_end_to_end_times() -> None:
    state = with_instance(two_stage_instance())
    state = apply_event(state, measured("r0", 12.0, ms_per_token=40.0, first_token_ms=300.0))
    instance = state.instances[InstanceId("i")]
    assert [shard.measured_stage_ms for shard in instance.shards] == [12.0, None]
    assert instance.measured_ms_per_token == 40.0
    assert instance.measured_time_to_first_token_ms == 300.0
    assert instance.measured_at == WHEN
    # The prediction stays beside the measurement.
    assert instance.placement.predicted_ms_per_token == GREEDY.predicted_ms_per_token
    assert instance.shards[0].predicted_stage_ms == 10.0


def test_another_rank_sets_only_its_own_stage() -> None:
    state = with_instance(two_stage_instance())
    state = apply_event(state, measured("r1", 25.0))
    instance = state.instances[InstanceId("i")]
    assert [shard.measured_stage_ms for shard in instance.shards] == [None, 25.0]
    assert instance.measured_ms_per_token is None
    assert instance.measured_time_to_first_token_ms is None
    assert instance.measured_at is None


@pytest.mark.parametrize(
    "event",
    [
        measured("r0", 12.0, instance_id="gone", ms_per_token=40.0),
        measured("r7", 12.0),  # not a runner of the instance
    ],
)
def test_a_measurement_of_an_unknown_instance_or_runner_changes_nothing(
    event: StageTimeMeasured,
) -> None:
    state = with_instance(two_stage_instance())
    assert apply_event(state, event) is state


def test_a_measurement_after_the_instance_was_deleted_changes_nothing() -> None:
    state = with_instance(two_stage_instance())
    state = apply_event(state, InstanceDeleted(instance_id=InstanceId("i")))
    assert apply_event(state, measured("r0", 12.0, ms_per_token=1.0)) is state


def test_calibration_starts_with_the_ratio_then_moves_halfway_to_each_sample() -> None:
    state = with_instance(two_stage_instance(base_stage_ms=(10.0, 20.0)))
    state = apply_event(state, measured("r0", 30.0, ms_per_token=50.0))
    state = apply_event(state, measured("r1", 10.0))
    first = state.device_calibration[NODE_A][GPU]
    assert (first.factor, first.samples, first.model_id, first.n_layers) == (3.0, 1, "m", 10)
    assert first.node_id == NODE_A and first.device_id == GPU
    # Node B's cuda:0 is another device, with its own factor.
    assert state.device_calibration[NODE_B][GPU].factor == 0.5
    later = WHEN + timedelta(seconds=10)
    state = apply_event(state, measured("r0", 10.0, ms_per_token=50.0, at=later))
    second = state.device_calibration[NODE_A][GPU]
    assert second.factor == pytest.approx(0.5 * 3.0 + 0.5 * 1.0)
    assert second.samples == 2
    assert second.measured_at == later
    state = apply_event(state, measured("r0", 40.0, ms_per_token=50.0))
    third = state.device_calibration[NODE_A][GPU]
    assert third.factor == pytest.approx(0.5 * 2.0 + 0.5 * 4.0)
    assert third.samples == 3


@pytest.mark.parametrize(
    "other",
    [
        two_stage_instance("j", model_id="another-model"),
        two_stage_instance("j", layers=(12, 30)),
    ],
)
def test_calibration_starts_afresh_for_another_model_or_layer_count(other: Instance) -> None:
    state = with_instance(two_stage_instance())
    state = apply_event(state, measured("r0", 30.0))
    state = apply_event(state, measured("r0", 30.0))
    assert state.device_calibration[NODE_A][GPU].samples == 2
    state = apply_event(state, InstanceCreated(instance=other))
    base = other.shards[0].base_stage_ms
    assert base is not None
    state = apply_event(state, measured("r0", 5.0, instance_id="j"))
    calibration = state.device_calibration[NODE_A][GPU]
    assert calibration.factor == pytest.approx(5.0 / base)
    assert calibration.samples == 1
    assert calibration.model_id == other.model_id
    assert calibration.n_layers == other.shards[0].n_layers


@pytest.mark.parametrize("base", [None, 0.0])
def test_no_calibration_without_an_uncalibrated_prediction(base: float | None) -> None:
    state = with_instance(two_stage_instance(base_stage_ms=(base, base)))
    state = apply_event(state, measured("r0", 30.0, ms_per_token=50.0))
    assert state.device_calibration == {}
    assert state.instances[InstanceId("i")].shards[0].measured_stage_ms == 30.0


def test_calibration_outlives_its_instance_and_its_nodes_time_out() -> None:
    state = with_instance(two_stage_instance())
    state = apply_event(state, measured("r0", 30.0))
    state = apply_event(state, InstanceDeleted(instance_id=InstanceId("i")))
    state = apply_event(state, NodeTimedOut(node_id=NODE_A))
    assert state.device_calibration[NODE_A][GPU].factor == 3.0


def test_apply_is_pure_and_measurements_round_trip_through_json() -> None:
    state = with_instance(two_stage_instance())
    event = measured("r0", 30.0, ms_per_token=50.0, first_token_ms=200.0)
    wire = EventAdapter.validate_json(EventAdapter.dump_json(event))
    assert wire == event
    new_state = apply(
        state.model_copy(update={"last_event_applied_idx": 0}), IndexedEvent(idx=1, event=wire)
    )
    assert state.instances[InstanceId("i")].measured_ms_per_token is None
    assert state.device_calibration == {}
    assert State.model_validate_json(new_state.model_dump_json()) == new_state
    assert new_state.instances[InstanceId("i")].measured_ms_per_token == 50.0
