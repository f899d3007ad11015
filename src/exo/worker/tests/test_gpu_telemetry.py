"""GPUTelemetryCollector: change detection (pure), sampling passes and the monitoring loop."""

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from exo.gpu.backends.simulated import SimulatedBackend
from exo.shared.apply import apply_event
from exo.shared.types.events import (
    DeviceGPUStatesUpdated,
    DeviceGPUStateUpdated,
    Event,
    GPUDeviceInfoReported,
    NodeInfoReported,
)
from exo.shared.types.gpu import DeviceGPUState, GPUBackendName, GPUDeviceInfo
from exo.shared.types.ids import DeviceId, NodeId
from exo.shared.types.node import NodeStaticInfo
from exo.shared.types.state import State
from exo.worker.gpu_telemetry import (
    UTILIZATION_MEDIAN_WINDOW,
    GPUTelemetryCollector,
    TelemetryConfig,
    emit_reason,
    should_emit,
)

pytestmark = pytest.mark.timeout(10)  # a stuck loop fails fast instead of hanging the run

NODE = NodeId("node-a")
GIB = 2**30
T0 = datetime(2025, 1, 1, tzinfo=UTC)
CONFIG = TelemetryConfig(heartbeat_s=10.0)
"""2 s passes (the default) and a 10 s heartbeat (the default is 30 s: shorter tests)."""
FAST = TelemetryConfig(interval_s=0.01, heartbeat_s=60.0)


def reading(device_id: str = "cuda:0", **changes: Any) -> DeviceGPUState:
    values: dict[str, Any] = {
        "device_id": DeviceId(device_id),
        "node_id": NODE,
        "memory_used_bytes": 10 * GIB,
        "memory_total_bytes": 80 * GIB,
        "compute_utilization_percent": 50.0,
        "thermal_temperature_c": 60.0,
        "thermal_throttle_threshold_c": 87.0,
        "last_update": T0,
    }
    values.update(changes)
    return DeviceGPUState(**values)


# --- the pure decision ---


def test_first_reading_is_emitted() -> None:
    assert emit_reason(None, reading(), T0, CONFIG) == "first reading"


@pytest.mark.parametrize(
    ("changes", "emitted"),
    [
        ({}, False),
        ({"memory_used_bytes": 10 * GIB + int(0.0099 * 80 * GIB)}, False),
        ({"memory_used_bytes": 10 * GIB + int(0.0101 * 80 * GIB)}, True),
        ({"memory_used_bytes": 10 * GIB - int(0.0101 * 80 * GIB)}, True),
        ({"compute_utilization_percent": 59.9}, False),
        ({"compute_utilization_percent": 60.0}, True),
        ({"compute_utilization_percent": 40.0}, True),
        ({"thermal_temperature_c": 61.9}, False),
        ({"thermal_temperature_c": 62.0}, True),
        ({"thermal_temperature_c": 58.0}, True),
        ({"thermal_temperature_c": -1.0}, True),  # sensor lost
        ({"is_thermal_throttling": True}, True),
        ({"is_plugged_in": False}, True),
        ({"battery_percent": 96.0}, False),
        ({"battery_percent": 95.0}, True),
        ({"memory_total_bytes": 40 * GIB, "memory_used_bytes": 10 * GIB}, True),
        ({"thermal_throttle_threshold_c": 83.0}, True),
        ({"power_draw_watts": 400.0, "sm_clock_mhz": 1200.0}, False),  # noise is not news
    ],
)
def test_threshold_decisions(changes: dict[str, Any], emitted: bool) -> None:
    previous = reading()
    current = reading(last_update=T0 + timedelta(seconds=2), **changes)
    assert should_emit(previous, current, T0 + timedelta(seconds=2), CONFIG) is emitted


@pytest.mark.parametrize(
    ("previous_median", "current_median", "reason"),
    [
        (50.0, 59.9, None),
        (50.0, 60.0, "utilisation median changed"),
        (50.0, 40.0, "utilisation median changed"),
        (None, 90.0, None),  # only compared when both readings carry a median
        (90.0, None, None),
    ],
)
def test_a_moved_median_is_emitted(
    previous_median: float | None, current_median: float | None, reason: str | None
) -> None:
    # The momentary reading is the same in both, so only the median can be news.
    previous = reading(utilization_median_percent=previous_median)
    current = reading(utilization_median_percent=current_median)
    assert emit_reason(previous, current, T0, CONFIG) == reason


def test_heartbeat() -> None:
    # Default interval 2 s: a reading up to 0.5 s early still counts (sampling jitter).
    previous = reading()
    later = reading(last_update=T0 + timedelta(seconds=9.4))
    assert emit_reason(previous, later, T0 + timedelta(seconds=9.4), CONFIG) is None
    due = reading(last_update=T0 + timedelta(seconds=9.5))
    assert emit_reason(previous, due, T0 + timedelta(seconds=9.5), CONFIG) == "heartbeat"
    fast = TelemetryConfig(interval_s=0.2, heartbeat_s=1.0)
    assert emit_reason(previous, later, T0 + timedelta(seconds=0.94), fast) is None
    assert emit_reason(previous, later, T0 + timedelta(seconds=0.95), fast) == "heartbeat"


def test_flips_are_emitted_at_once_even_for_tiny_changes() -> None:
    previous = reading(is_thermal_throttling=False)
    now = T0 + timedelta(milliseconds=1)
    assert emit_reason(previous, reading(is_thermal_throttling=True), now, CONFIG) == (
        "thermal throttling started"
    )
    assert emit_reason(previous, reading(is_plugged_in=False), now, CONFIG) == "unplugged"


def test_custom_thresholds() -> None:
    strict = TelemetryConfig(utilization_change_percent=1.0, temperature_change_c=0.5)
    assert should_emit(reading(), reading(compute_utilization_percent=51.0), T0, strict)
    assert should_emit(reading(), reading(thermal_temperature_c=60.5), T0, strict)
    with pytest.raises(ValueError):
        TelemetryConfig(interval_s=0)


@given(
    memory_step=st.floats(min_value=0, max_value=0.0099),
    utilisation=st.floats(min_value=0, max_value=100),
    utilisation_step=st.floats(min_value=-9.9, max_value=9.9),
    temperature_step=st.floats(min_value=-1.9, max_value=1.9),
    seconds=st.floats(min_value=0, max_value=9.49),
)
def test_small_changes_within_the_heartbeat_are_never_emitted(
    memory_step: float,
    utilisation: float,
    utilisation_step: float,
    temperature_step: float,
    seconds: float,
) -> None:
    previous = reading(compute_utilization_percent=utilisation)
    now = T0 + timedelta(seconds=seconds)
    current = reading(
        memory_used_bytes=10 * GIB + int(memory_step * 80 * GIB),
        compute_utilization_percent=min(100.0, max(0.0, utilisation + utilisation_step)),
        thermal_temperature_c=60.0 + temperature_step,
        last_update=now,
    )
    assert emit_reason(previous, current, now, CONFIG) is None


# --- the collector, against a scripted backend (the GPUBackend protocol is its boundary) ---


class ScriptedBackend:
    """A GPUBackend whose readings the test sets; ``failures`` makes the next samples raise."""

    def __init__(
        self, device_ids: list[str], clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self.clock = clock
        self.states: dict[DeviceId, DeviceGPUState] = {
            DeviceId(device_id): reading(device_id) for device_id in device_ids
        }
        self.failures: dict[DeviceId, int] = {}
        self.sample_count = 0
        self.initialize_count = 0
        self.shutdown_count = 0

    @property
    def name(self) -> GPUBackendName:
        return "simulated"

    async def initialize(self) -> None:
        self.initialize_count += 1

    async def shutdown(self) -> None:
        self.shutdown_count += 1

    async def list_devices(self, node_id: NodeId) -> list[GPUDeviceInfo]:
        return [
            GPUDeviceInfo(
                device_id=device_id,
                node_id=node_id,
                name="Scripted GPU",
                vendor="test",
                backend="simulated",
                memory_total_bytes=state.memory_total_bytes,
                memory_bandwidth_gbps=1000.0,
                peak_tflops_fp16=100.0,
                is_simulated=True,
            )
            for device_id, state in self.states.items()
        ]

    async def sample(self, node_id: NodeId, device_id: DeviceId) -> DeviceGPUState:
        self.sample_count += 1
        if self.failures.get(device_id, 0) > 0:
            self.failures[device_id] -= 1
            raise RuntimeError(f"{device_id} fell off the bus")
        return self.states[device_id].model_copy(
            update={"node_id": node_id, "last_update": self.clock()}
        )

    def set(self, device_id: str, **changes: Any) -> None:
        key = DeviceId(device_id)
        self.states[key] = self.states[key].model_copy(update=changes)


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    async def __call__(self, event: Event) -> None:
        self.events.append(event)

    def telemetry(self) -> list[DeviceGPUStateUpdated | DeviceGPUStatesUpdated]:
        return [
            event
            for event in self.events
            if isinstance(event, DeviceGPUStateUpdated | DeviceGPUStatesUpdated)
        ]

    def states(self, device_id: str | None = None) -> list[DeviceGPUState]:
        """Every full reading emitted (in either kind of event), oldest first."""
        full: list[DeviceGPUState] = []
        for event in self.telemetry():
            if isinstance(event, DeviceGPUStateUpdated):
                full.append(event.device_state)
            else:
                full.extend(event.device_states)
        return [s for s in full if device_id is None or s.device_id == device_id]

    def heartbeats(self, device_id: str) -> int:
        """How many times the device went out by id only."""
        return sum(
            DeviceId(device_id) in event.unchanged_device_ids
            for event in self.telemetry()
            if isinstance(event, DeviceGPUStatesUpdated)
        )

    def infos(self) -> list[GPUDeviceInfo]:
        return [
            event.device_info for event in self.events if isinstance(event, GPUDeviceInfoReported)
        ]


async def wait_until(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    with anyio.fail_after(timeout_s):
        while not condition():
            await anyio.sleep(0.005)


@pytest.mark.anyio
async def test_collect_emits_changes_only() -> None:
    backend = ScriptedBackend(["cuda:0", "cuda:1"])
    recorder = Recorder()
    collector = GPUTelemetryCollector(NODE, backend, recorder, FAST)

    readings = await collector.collect_device_state()
    assert [state.device_id for state in readings] == ["cuda:0", "cuda:1"]
    assert [info.device_id for info in recorder.infos()] == ["cuda:0", "cuda:1"]
    assert len(recorder.states()) == 2
    assert all(event.origin_node_id == NODE for event in recorder.events)

    await collector.collect_device_state()
    assert len(recorder.states()) == 2  # nothing changed
    assert len(recorder.infos()) == 2  # facts reported once

    backend.set("cuda:1", memory_used_bytes=40 * GIB)
    readings = await collector.collect_device_state()
    assert len(readings) == 2
    assert [state.memory_used_bytes for state in recorder.states("cuda:1")] == [10 * GIB, 40 * GIB]
    assert len(recorder.states("cuda:0")) == 1
    assert collector.last_readings[DeviceId("cuda:1")].memory_used_bytes == 40 * GIB


@pytest.mark.anyio
async def test_utilisation_median_ignores_a_spike_and_follows_a_sustained_change() -> None:
    assert UTILIZATION_MEDIAN_WINDOW == 5
    backend = ScriptedBackend(["cuda:0"])
    recorder = Recorder()
    collector = GPUTelemetryCollector(NODE, backend, recorder, FAST)

    async def medians_for(*utilisations: float) -> list[float | None]:
        medians: list[float | None] = []
        for utilisation in utilisations:
            backend.set("cuda:0", compute_utilization_percent=utilisation)
            (state,) = await collector.collect_device_state()
            assert state.compute_utilization_percent == utilisation  # the momentary reading
            assert collector.last_readings[DeviceId("cuda:0")] == state
            medians.append(state.utilization_median_percent)
        return medians

    # Steady at 40 %, one 100 % spike: the median never moves (the spike itself is still
    # emitted, as any momentary change of >= 10 points is).
    assert await medians_for(40, 40, 40, 40, 100, 40, 40, 40, 40, 40) == [40.0] * 10
    assert [state.compute_utilization_percent for state in recorder.states()] == [40, 100, 40]
    assert {state.utilization_median_percent for state in recorder.states()} == {40.0}

    # Sustained 80 %: the median follows once it is most of the window (3 of 5 samples), and
    # that move alone is emitted (the momentary 80 % went out on the first sample).
    assert await medians_for(80, 80, 80, 80, 80) == [40.0, 40.0, 80.0, 80.0, 80.0]
    sustained = recorder.states()[3:]
    assert [(s.compute_utilization_percent, s.utilization_median_percent) for s in sustained] == [
        (80.0, 40.0),
        (80.0, 80.0),
    ]

    # Fewer samples than the window: the median of what there is.
    fresh = GPUTelemetryCollector(NODE, ScriptedBackend(["cuda:0"]), Recorder(), FAST)
    (first,) = await fresh.collect_device_state()
    assert first.utilization_median_percent == 50.0

    # A device that goes away and comes back starts a fresh window.
    gone = backend.states.pop(DeviceId("cuda:0"))
    assert await collector.collect_device_state() == []
    backend.states[DeviceId("cuda:0")] = gone
    assert await medians_for(0) == [0.0]


@pytest.mark.anyio
async def test_forget_reported_re_sends_facts_and_readings() -> None:
    backend = ScriptedBackend(["cuda:0"])
    recorder = Recorder()
    collector = GPUTelemetryCollector(NODE, backend, recorder, FAST)
    await collector.collect_device_state()
    await collector.collect_device_state()
    assert [event.kind for event in recorder.events] == [
        "GPUDeviceInfoReported",
        "DeviceGPUStateUpdated",
    ]
    collector.forget_reported()
    await collector.collect_device_state()
    assert [event.kind for event in recorder.events[2:]] == [
        "GPUDeviceInfoReported",
        "DeviceGPUStateUpdated",
    ]


@pytest.mark.anyio
async def test_collect_sends_heartbeats() -> None:
    backend = ScriptedBackend(["cuda:0"])
    recorder = Recorder()
    collector = GPUTelemetryCollector(
        NODE, backend, recorder, TelemetryConfig(interval_s=0.01, heartbeat_s=0.05)
    )
    await collector.collect_device_state()
    await collector.collect_device_state()
    assert len(recorder.telemetry()) == 1
    await anyio.sleep(0.06)
    await collector.collect_device_state()
    assert len(recorder.telemetry()) == 2
    assert len(recorder.states()) == 1  # the heartbeat went out by id only
    assert recorder.heartbeats("cuda:0") == 1


@pytest.mark.anyio
async def test_throttle_flip_is_emitted_on_the_next_pass() -> None:
    backend = ScriptedBackend(["cuda:0"])
    recorder = Recorder()
    collector = GPUTelemetryCollector(NODE, backend, recorder, FAST)
    await collector.collect_device_state()
    backend.set("cuda:0", is_thermal_throttling=True, thermal_temperature_c=60.5)
    await collector.collect_device_state()
    assert [state.is_thermal_throttling for state in recorder.states()] == [False, True]


@pytest.mark.anyio
async def test_start_reports_facts_then_samples_until_stopped() -> None:
    backend = ScriptedBackend(["cuda:0", "cuda:1"])
    recorder = Recorder()
    collector = GPUTelemetryCollector(NODE, backend, recorder, FAST)
    await collector.start_monitoring()
    try:
        assert collector.is_running
        assert [type(event) for event in recorder.events[:2]] == [GPUDeviceInfoReported] * 2
        await wait_until(lambda: len(recorder.states()) >= 2)
        backend.set("cuda:0", compute_utilization_percent=95.0)
        await wait_until(lambda: len(recorder.states("cuda:0")) >= 2)
    finally:
        await collector.stop_monitoring()
    assert not collector.is_running
    assert backend.shutdown_count == 1  # the collector owns the backend by default
    samples_at_stop = backend.sample_count
    await anyio.sleep(0.05)
    assert backend.sample_count == samples_at_stop
    await collector.stop_monitoring()  # idempotent
    assert backend.shutdown_count == 1


@pytest.mark.anyio
async def test_failing_samples_are_logged_and_retried(logged_warnings: list[str]) -> None:
    backend = ScriptedBackend(["cuda:0", "cuda:1"])
    backend.failures[DeviceId("cuda:0")] = 5
    recorder = Recorder()
    collector = GPUTelemetryCollector(NODE, backend, recorder, FAST)
    await collector.start_monitoring()
    try:
        await wait_until(lambda: len(recorder.states("cuda:0")) == 1)
        assert collector.is_running
        assert len(recorder.states("cuda:1")) == 1  # the healthy device was never held up
    finally:
        await collector.stop_monitoring()
    failures = [message for message in logged_warnings if "cuda:0" in message]
    assert len(failures) == 1  # once per failure streak, not once per tick
    assert "fell off the bus" in failures[0]


@pytest.mark.anyio
async def test_a_device_that_disappears_is_forgotten(logged_warnings: list[str]) -> None:
    backend = ScriptedBackend(["cuda:0", "cuda:1", "cuda:2"])
    backend.failures[DeviceId("cuda:2")] = 100
    recorder = Recorder()

    async def refuse_cuda_1_facts(event: Event) -> None:
        if isinstance(event, GPUDeviceInfoReported) and event.device_info.device_id == "cuda:1":
            raise ConnectionError("not now")
        await recorder(event)

    collector = GPUTelemetryCollector(NODE, backend, refuse_cuda_1_facts, FAST)
    await collector.collect_device_state()
    assert set(collector.last_readings) == {"cuda:0", "cuda:1"}
    assert sum("cuda:2" in message for message in logged_warnings) == 1

    # cuda:1 (read, but its facts never went out) and cuda:2 (failing) go away...
    unplugged = {key: backend.states.pop(DeviceId(key)) for key in ("cuda:1", "cuda:2")}
    await collector.collect_device_state()
    assert set(collector.last_readings) == {"cuda:0"}

    # ...and when cuda:2 comes back still failing, that is a new failure streak, logged again.
    backend.states[DeviceId("cuda:2")] = unplugged["cuda:2"]
    await collector.collect_device_state()
    assert sum("cuda:2" in message for message in logged_warnings) == 2


@pytest.mark.anyio
async def test_a_failing_emitter_is_retried(logged_warnings: list[str]) -> None:
    backend = ScriptedBackend(["cuda:0"])
    delivered: list[Event] = []
    attempts = [0]

    async def flaky(event: Event) -> None:
        attempts[0] += 1
        if attempts[0] <= 2:
            raise ConnectionError("router not ready")
        delivered.append(event)

    collector = GPUTelemetryCollector(NODE, backend, flaky, FAST)
    await collector.collect_device_state()  # info fails, state fails
    assert delivered == []
    await collector.collect_device_state()
    assert [event.kind for event in delivered] == ["GPUDeviceInfoReported", "DeviceGPUStateUpdated"]
    assert len(logged_warnings) == 2


@pytest.mark.anyio
async def test_starting_twice_raises() -> None:
    backend = ScriptedBackend(["cuda:0"])
    collector = GPUTelemetryCollector(NODE, backend, Recorder(), FAST)
    await collector.start_monitoring()
    try:
        with pytest.raises(RuntimeError, match="already running"):
            await collector.start_monitoring()
        async with anyio.create_task_group() as task_group:
            with pytest.raises(RuntimeError, match="already running"):
                await collector.start_monitoring(task_group)
    finally:
        await collector.stop_monitoring()


@pytest.mark.anyio
async def test_in_a_task_group_stop_from_another_task_and_cancel() -> None:
    backend = ScriptedBackend(["cuda:0"])
    recorder = Recorder()
    collector = GPUTelemetryCollector(NODE, backend, recorder, FAST)
    async with anyio.create_task_group() as task_group:
        await collector.start_monitoring(task_group)
        assert len(recorder.infos()) == 1
        task_group.start_soon(collector.stop_monitoring)
    assert not collector.is_running
    assert backend.shutdown_count == 1

    # Restart: the backend is initialised again; cancelling the group also stops it cleanly.
    async with anyio.create_task_group() as task_group:
        await collector.start_monitoring(task_group)
        assert backend.initialize_count == 1
        await wait_until(lambda: len(recorder.states()) >= 1)
        task_group.cancel_scope.cancel()
    assert not collector.is_running
    assert backend.shutdown_count == 2


@pytest.mark.anyio
async def test_stop_without_a_task_group_must_come_from_the_starting_task() -> None:
    collector = GPUTelemetryCollector(NODE, ScriptedBackend(["cuda:0"]), Recorder(), FAST)
    await collector.start_monitoring()
    try:
        errors: list[Exception] = []

        async def stop_elsewhere() -> None:
            try:
                await collector.stop_monitoring()
            except RuntimeError as error:
                errors.append(error)

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(stop_elsewhere)
        assert len(errors) == 1
        assert collector.is_running
    finally:
        await collector.stop_monitoring()
    assert not collector.is_running


@pytest.mark.anyio
async def test_stop_during_cancellation_of_the_caller() -> None:
    backend = ScriptedBackend(["cuda:0"])
    collector = GPUTelemetryCollector(NODE, backend, Recorder(), FAST)
    with anyio.move_on_after(0.05):
        await collector.start_monitoring()
        try:
            await anyio.sleep(10)
        finally:
            await collector.stop_monitoring()
    assert not collector.is_running
    assert backend.shutdown_count == 1


@pytest.mark.anyio
async def test_end_to_end_with_the_simulated_backend(tmp_path: Path) -> None:
    path = tmp_path / "gpus.json"

    def write(used_gib: int, throttling: bool) -> None:
        device = {
            "device_id": "cuda:0",
            "memory_total_bytes": 80 * GIB,
            "memory_used_bytes": used_gib * GIB,
            "is_thermal_throttling": throttling,
        }
        path.write_text(json.dumps({"devices": [device]}))

    write(used_gib=1, throttling=False)
    backend = SimulatedBackend(path)
    await backend.initialize()
    recorder = Recorder()
    collector = GPUTelemetryCollector(NODE, backend, recorder, FAST)
    await collector.start_monitoring()
    try:
        await wait_until(lambda: len(recorder.states()) == 1)
        write(used_gib=50, throttling=True)
        await wait_until(lambda: len(recorder.states()) == 2)
    finally:
        await collector.stop_monitoring()
    first, second = recorder.states()
    assert (first.memory_used_bytes, second.memory_used_bytes) == (1 * GIB, 50 * GIB)
    assert second.is_thermal_throttling and second.is_simulated
    assert recorder.infos()[0].is_simulated


# --- one event per pass: readings in full, heartbeats by id, aligned ---


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


SIXTEEN = [f"cuda:{index}" for index in range(16)]


class Pass:
    """A collector on a fake clock at CONFIG (2 s passes, 10 s heartbeat)."""

    def __init__(self, device_ids: list[str]) -> None:
        self.clock = FakeClock()
        self.backend = ScriptedBackend(device_ids, self.clock)
        self.recorder = Recorder()
        self.collector = GPUTelemetryCollector(
            NODE, self.backend, self.recorder, CONFIG, clock=self.clock
        )

    async def at(self, seconds: float) -> list[DeviceGPUStateUpdated | DeviceGPUStatesUpdated]:
        """Run the pass at T0 + seconds; the telemetry events it emitted."""
        self.clock.now = T0 + timedelta(seconds=seconds)
        before = len(self.recorder.telemetry())
        await self.collector.collect_device_state()
        return self.recorder.telemetry()[before:]

    def applied(self) -> State:
        """The cluster state after applying everything the collector emitted."""
        info = NodeStaticInfo(
            friendly_name="a", hostname="a", os="Linux", cpu_count=1, ram_total_bytes=1
        )
        state = apply_event(
            State(),
            NodeInfoReported(node_id=NODE, info=info, ram_available_bytes=1, reported_at=T0),
        )
        for event in self.recorder.events:
            state = apply_event(state, event)
        return state


@pytest.mark.anyio
async def test_a_pass_over_sixteen_devices_is_one_event() -> None:
    run = Pass(SIXTEEN)
    (first,) = await run.at(0)
    assert isinstance(first, DeviceGPUStatesUpdated)
    assert [s.device_id for s in first.device_states] == SIXTEEN
    assert first.unchanged_device_ids == [] and first.node_id == NODE
    assert first.sampled_at == T0 and first.origin_node_id == NODE
    assert await run.at(2) == []  # nothing changed, no heartbeat due

    # One device changing alone is the seed's single event.
    run.backend.set("cuda:7", memory_used_bytes=40 * GIB)
    (single,) = await run.at(4)
    assert isinstance(single, DeviceGPUStateUpdated)
    assert single.device_state.memory_used_bytes == 40 * GIB


@pytest.mark.anyio
async def test_idle_heartbeats_are_one_event_with_ids_only() -> None:
    run = Pass(SIXTEEN)
    await run.at(0)
    heartbeats: list[DeviceGPUStateUpdated | DeviceGPUStatesUpdated] = []
    for seconds in range(2, 42, 2):
        heartbeats += await run.at(seconds)
    assert len(heartbeats) == 4  # at 10, 20, 30 and 40 s: one event per heartbeat
    for event, seconds in zip(heartbeats, (10, 20, 30, 40), strict=True):
        assert isinstance(event, DeviceGPUStatesUpdated)
        assert event.device_states == []
        assert event.unchanged_device_ids == SIXTEEN
        assert event.sampled_at == T0 + timedelta(seconds=seconds)
    # The state holds the first readings, refreshed to the last heartbeat.
    stored = run.applied().gpu_device_state[NODE]
    assert set(stored) == set(SIXTEEN)
    for state in stored.values():
        assert state.last_update == T0 + timedelta(seconds=40)
        assert state.memory_used_bytes == 10 * GIB
    assert run.applied().nodes[NODE].last_seen == T0 + timedelta(seconds=40)


@pytest.mark.anyio
async def test_heartbeats_align_after_one_device_changed_alone() -> None:
    run = Pass(SIXTEEN)
    await run.at(0)
    run.backend.set("cuda:3", memory_used_bytes=30 * GIB)
    (changed,) = await run.at(4)
    assert isinstance(changed, DeviceGPUStateUpdated)  # the others' last emission is 4 s old
    assert await run.at(6) == [] and await run.at(8) == []
    # At 10 s the 15 others are due; cuda:3 (6 s since its reading, >= heartbeat / 2) goes
    # along, rather than heartbeating on its own at 14 s.
    (together,) = await run.at(10)
    assert isinstance(together, DeviceGPUStatesUpdated)
    assert together.device_states == [] and together.unchanged_device_ids == SIXTEEN
    later: list[DeviceGPUStateUpdated | DeviceGPUStatesUpdated] = []
    for seconds in range(12, 32, 2):
        later += await run.at(seconds)
    assert [e.sampled_at for e in later if isinstance(e, DeviceGPUStatesUpdated)] == [
        T0 + timedelta(seconds=20),
        T0 + timedelta(seconds=30),
    ]
    assert all(
        isinstance(e, DeviceGPUStatesUpdated) and len(e.unchanged_device_ids) == 16 for e in later
    )

    # A change at least heartbeat / 2 after the others' last emission takes them along.
    run.backend.set("cuda:5", memory_used_bytes=30 * GIB)
    (with_others,) = await run.at(36)
    assert isinstance(with_others, DeviceGPUStatesUpdated)
    assert [s.device_id for s in with_others.device_states] == ["cuda:5"]
    assert with_others.unchanged_device_ids == [d for d in SIXTEEN if d != "cuda:5"]
    assert await run.at(38) == [] and await run.at(44) == []
    (next_heartbeat,) = await run.at(46)
    assert isinstance(next_heartbeat, DeviceGPUStatesUpdated)
    assert next_heartbeat.unchanged_device_ids == SIXTEEN


@pytest.mark.anyio
async def test_a_heartbeat_does_not_swallow_drift_below_the_threshold() -> None:
    # Used memory creeps up by 1/8 GiB a pass; 1 % of 80 GiB (0.8 GiB) is news.
    run = Pass(["cuda:0", "cuda:1"])
    emitted_at: list[tuple[int, int]] = []
    for step in range(0, 11):
        run.backend.set("cuda:0", memory_used_bytes=10 * GIB + step * GIB // 8)
        for event in await run.at(2 * step):
            if isinstance(event, DeviceGPUStatesUpdated):
                full = event.device_states
                assert DeviceId("cuda:1") in [s.device_id for s in full] or (
                    DeviceId("cuda:1") in event.unchanged_device_ids
                )
            else:
                full = [event.device_state]
            emitted_at += [(2 * step, s.memory_used_bytes) for s in full if s.device_id == "cuda:0"]
        if step == 5:  # the heartbeat at 10 s: the state keeps the emitted 10 GiB
            assert run.recorder.heartbeats("cuda:0") == 1
            stored = run.applied().gpu_device_state[NODE][DeviceId("cuda:0")]
            assert stored.memory_used_bytes == 10 * GIB
            assert stored.last_update == T0 + timedelta(seconds=10)
    # Emitted at 0 s, then when the drift since *that* reading passed 0.8 GiB (14 s), not
    # 0.8 GiB after the values at the heartbeat (24 s).
    assert emitted_at == [(0, 10 * GIB), (14, 10 * GIB + 7 * GIB // 8)]
    assert run.applied().gpu_device_state[NODE][DeviceId("cuda:0")].memory_used_bytes == (
        10 * GIB + 7 * GIB // 8
    )


@pytest.mark.anyio
async def test_a_refused_pass_is_sent_again_in_full() -> None:
    clock = FakeClock()
    backend = ScriptedBackend(["cuda:0", "cuda:1"], clock)
    delivered: list[Event] = []
    refuse = [True]

    async def emitter(event: Event) -> None:
        if refuse[0] and isinstance(event, DeviceGPUStatesUpdated):
            raise ConnectionError("not now")
        delivered.append(event)

    collector = GPUTelemetryCollector(NODE, backend, emitter, CONFIG, clock=clock)
    await collector.collect_device_state()
    assert not any(isinstance(event, DeviceGPUStatesUpdated) for event in delivered)
    refuse[0] = False
    clock.advance(2)
    await collector.collect_device_state()
    (event,) = [e for e in delivered if isinstance(e, DeviceGPUStatesUpdated)]
    assert [s.device_id for s in event.device_states] == ["cuda:0", "cuda:1"]

    # A refused heartbeat is not remembered as sent either: the next pass carries it.
    refuse[0] = True
    clock.advance(10)
    await collector.collect_device_state()
    refuse[0] = False
    clock.advance(2)
    await collector.collect_device_state()
    heartbeat = delivered[-1]
    assert isinstance(heartbeat, DeviceGPUStatesUpdated)
    assert heartbeat.unchanged_device_ids == ["cuda:0", "cuda:1"]
    assert heartbeat.sampled_at == clock.now


@pytest.mark.anyio
async def test_every_sampled_change_of_condition_is_counted_in_the_readings() -> None:
    """Throttling that comes and goes between two looks still shows: each reading counts
    the condition changes its device went through (throttling, power), and the state the
    master applies carries the count of the newest reading."""
    run = Pass(["cuda:0", "cuda:1"])
    (first,) = await run.at(0)
    assert isinstance(first, DeviceGPUStatesUpdated)
    assert [state.condition_changes for state in first.device_states] == [0, 0]
    for step, hot in enumerate([True, False, True, False], start=1):
        run.backend.set("cuda:0", is_thermal_throttling=hot)
        await run.at(2 * step)
    run.backend.set("cuda:0", is_plugged_in=False)
    await run.at(10)
    readings = run.applied().gpu_device_state[NODE]
    assert readings[DeviceId("cuda:0")].condition_changes == 5
    assert readings[DeviceId("cuda:1")].condition_changes == 0
    # Samples that change nothing leave the count alone.
    await run.at(12)
    assert run.collector.last_readings[DeviceId("cuda:0")].condition_changes == 5
