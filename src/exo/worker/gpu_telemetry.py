"""GPU telemetry: sample this node's devices on an interval and report what matters.

``GPUTelemetryCollector`` reports each device's static facts once
(``GPUDeviceInfoReported``, again only if they change) and a live reading whenever it changed
meaningfully or a heartbeat is due; see ``emit_reason`` for the rule, which is a pure function
of (last emitted reading, new reading, now, config). A pass emits at most one event for the
node: ``DeviceGPUStatesUpdated`` with the changed readings in full and the heartbeats by id
(``DeviceGPUStateUpdated`` when it is a single changed reading).

Each reading also carries ``utilization_median_percent``: the median of the device's last
``UTILIZATION_MEDIAN_WINDOW`` utilisation samples, the current one included. Placement uses it
rather than the momentary reading, so one busy or idle sample does not move a decision.
"""

import statistics
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import anyio
from anyio.abc import TaskGroup, TaskStatus
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field

from exo.gpu.backend import GPUBackend
from exo.shared.types.events import (
    DeviceGPUStatesUpdated,
    DeviceGPUStateUpdated,
    Event,
    GPUDeviceInfoReported,
)
from exo.shared.types.gpu import UNKNOWN_TEMPERATURE_C, DeviceGPUState, GPUDeviceInfo
from exo.shared.types.ids import DeviceId, NodeId

EventEmitter = Callable[[Event], Awaitable[None]]

UTILIZATION_MEDIAN_WINDOW = 5
"""How many of a device's latest utilisation samples (the current one included) the reported
median covers: with 5 at the default 2 s interval, a change must last about 6 s (3 samples)
before the median follows it, and a single spike never moves it."""


class TelemetryConfig(BaseModel):
    """How often to sample, and what counts as a change worth an event."""

    model_config = ConfigDict(frozen=True)

    interval_s: float = Field(default=2.0, gt=0, description="Seconds between sampling passes.")
    heartbeat_s: float = Field(
        default=30.0, gt=0, description="Re-send an unchanged reading after this many seconds."
    )
    memory_change_fraction: float = Field(
        default=0.01, ge=0, description="Used memory moved by at least this share of the total."
    )
    utilization_change_percent: float = Field(
        default=10.0,
        ge=0,
        description="Utilisation, or its median over recent samples, moved by at least this "
        "many points.",
    )
    temperature_change_c: float = Field(
        default=2.0, ge=0, description="Temperature moved by at least this many degrees."
    )
    battery_change_percent: float = Field(
        default=5.0, ge=0, description="Battery level moved by at least this many points."
    )


def emit_reason(
    previous: DeviceGPUState | None,
    current: DeviceGPUState,
    now: datetime,
    config: TelemetryConfig,
) -> str | None:
    """Why ``current`` should be emitted given the last emitted reading, or None if not.

    Emitted at once: the first reading, a throttling or plug-state flip, a changed throttle
    threshold or memory total, a temperature appearing or disappearing. Emitted on change:
    used memory by >= ``memory_change_fraction`` of the total, utilisation or its median
    (``utilization_median_percent``, when both readings have one) by >=
    ``utilization_change_percent`` points, temperature by >= ``temperature_change_c``,
    battery by >= ``battery_change_percent`` points. Otherwise emitted when the last emitted
    reading is ``heartbeat_s`` old, less a jitter allowance of a quarter interval (at most
    0.5 s): readings are taken a little after each tick, so without it a 10 s heartbeat on a
    2 s interval would slip to every 12 s.
    """
    if previous is None:
        return "first reading"
    if current.is_thermal_throttling != previous.is_thermal_throttling:
        return "thermal throttling started" if current.is_thermal_throttling else "throttling ended"
    if current.is_plugged_in != previous.is_plugged_in:
        return "plugged in" if current.is_plugged_in else "unplugged"
    if current.memory_total_bytes != previous.memory_total_bytes:
        return "memory total changed"
    if current.thermal_throttle_threshold_c != previous.thermal_throttle_threshold_c:
        return "throttle threshold changed"
    memory_step = config.memory_change_fraction * current.memory_total_bytes
    memory_delta = abs(current.memory_used_bytes - previous.memory_used_bytes)
    if memory_delta > 0 and memory_delta >= memory_step:
        return "memory use changed"
    utilisation_delta = abs(
        current.compute_utilization_percent - previous.compute_utilization_percent
    )
    if utilisation_delta > 0 and utilisation_delta >= config.utilization_change_percent:
        return "utilisation changed"
    if (
        current.utilization_median_percent is not None
        and previous.utilization_median_percent is not None
    ):
        median_delta = abs(current.utilization_median_percent - previous.utilization_median_percent)
        if median_delta > 0 and median_delta >= config.utilization_change_percent:
            return "utilisation median changed"
    was_known = previous.thermal_temperature_c != UNKNOWN_TEMPERATURE_C
    is_known = current.thermal_temperature_c != UNKNOWN_TEMPERATURE_C
    if was_known != is_known:
        return "temperature sensor appeared" if is_known else "temperature sensor lost"
    temperature_delta = abs(current.thermal_temperature_c - previous.thermal_temperature_c)
    if temperature_delta > 0 and temperature_delta >= config.temperature_change_c:
        return "temperature changed"
    battery_delta = abs(current.battery_percent - previous.battery_percent)
    if battery_delta > 0 and battery_delta >= config.battery_change_percent:
        return "battery level changed"
    jitter_allowance_s = min(0.25 * config.interval_s, 0.5)
    if (now - previous.last_update).total_seconds() >= config.heartbeat_s - jitter_allowance_s:
        return "heartbeat"
    return None


def should_emit(
    previous: DeviceGPUState | None,
    current: DeviceGPUState,
    now: datetime,
    config: TelemetryConfig,
) -> bool:
    """True when ``current`` differs meaningfully from ``previous`` or a heartbeat is due."""
    return emit_reason(previous, current, now, config) is not None


class GPUTelemetryCollector:
    """Samples this node's GPU devices and emits telemetry events.

    Concurrency (anyio). The collector is an actor whose body is ``run()``; it needs a task
    group to live in. Three equivalent ways to drive it:

    - ``await collector.start_monitoring(task_group)``: starts ``run`` in *your* task group
      and returns once every device's static facts have been emitted. ``stop_monitoring()``
      may then be called from any task; cancelling the task group stops it too.
    - ``await collector.start_monitoring()`` (the seed's form): the collector opens a
      private task group in the calling task. As with a context manager, call
      ``stop_monitoring()`` from that same task, at the same nesting level (typically in a
      ``finally``); a RuntimeError says so otherwise.
    - ``task_group.start_soon(collector.run)`` or ``await task_group.start(collector.run)``.

    Whichever way it ends (stop or cancellation), the loop stops and, when ``owns_backend``
    (the default, since the seed passes a freshly created backend), the backend is shut down;
    a later start initialises it again. A sample that raises is logged and retried on the
    next tick; an event the emitter fails to take is retried on the next tick too.
    """

    def __init__(
        self,
        node_id: NodeId,
        gpu_backend: GPUBackend,
        event_emitter: EventEmitter,
        config: TelemetryConfig | None = None,
        *,
        owns_backend: bool = True,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.node_id = node_id
        self.gpu_backend = gpu_backend
        self.event_emitter = event_emitter
        self.config = config or TelemetryConfig()
        self.owns_backend = owns_backend
        self._clock = clock  # "now" for the change test and a pass's sampled_at
        self._is_running = False
        self._backend_is_shut_down = False
        self._reported_info: dict[DeviceId, GPUDeviceInfo] = {}
        self._last_emitted: dict[DeviceId, DeviceGPUState] = {}
        self._last_readings: dict[DeviceId, DeviceGPUState] = {}
        self._utilization_samples: dict[DeviceId, deque[float]] = {}
        self._failing_devices: set[DeviceId] = set()
        self._listing_failed = False
        self._cancel_scope: anyio.CancelScope | None = None
        self._finished = anyio.Event()
        self._finished.set()
        self._private_task_group: TaskGroup | None = None
        self._private_host_task_id: int | None = None

    @property
    def is_running(self) -> bool:
        return self._is_running

    @property
    def last_readings(self) -> dict[DeviceId, DeviceGPUState]:
        """The most recent reading of each device (emitted or not)."""
        return dict(self._last_readings)

    def forget_reported(self) -> None:
        """Forget what was emitted, so the next pass reports every device's facts and a fresh
        reading again (e.g. after the cluster dropped this node's state on a timeout)."""
        self._reported_info.clear()
        self._last_emitted.clear()

    async def start_monitoring(self, task_group: TaskGroup | None = None) -> None:
        """Report device facts, then sample in the background until stopped.

        Raises RuntimeError if monitoring is already running.
        """
        if self._is_running or self._private_task_group is not None:
            raise RuntimeError("GPU telemetry monitoring is already running")
        if task_group is not None:
            await task_group.start(self.run)
            return
        group = anyio.create_task_group()
        await group.__aenter__()
        try:
            await group.start(self.run)
        except BaseException:
            await group.__aexit__(None, None, None)
            raise
        self._private_task_group = group
        self._private_host_task_id = anyio.get_current_task().id

    async def stop_monitoring(self) -> None:
        """Stop sampling and wait until the loop has ended. Safe to call more than once."""
        group = self._private_task_group
        if group is not None and anyio.get_current_task().id != self._private_host_task_id:
            raise RuntimeError(
                "stop_monitoring() must run in the task that called start_monitoring() "
                "without a task group; pass a task group to start_monitoring() instead"
            )
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            await self._finished.wait()
        if group is not None:
            self._private_task_group = None
            self._private_host_task_id = None
            await group.__aexit__(None, None, None)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The actor body: report device facts, signal started, loop until stopped."""
        if self._is_running:
            raise RuntimeError("GPU telemetry monitoring is already running")
        self._is_running = True
        self._finished = anyio.Event()
        try:
            with anyio.CancelScope() as scope:
                self._cancel_scope = scope
                if self._backend_is_shut_down:
                    await self.gpu_backend.initialize()
                    self._backend_is_shut_down = False
                devices = await self._refresh_device_info()
                logger.info(
                    f"GPU telemetry monitoring started ({self.gpu_backend.name} backend, "
                    f"{len(devices)} device(s), every {self.config.interval_s:g} s)"
                )
                task_status.started()
                await self._monitoring_loop()
        finally:
            self._cancel_scope = None
            try:
                if self.owns_backend and not self._backend_is_shut_down:
                    self._backend_is_shut_down = True
                    with anyio.CancelScope(shield=True):
                        await self._shutdown_backend()
            finally:
                self._is_running = False
                self._finished.set()
                logger.info("GPU telemetry monitoring stopped")

    async def collect_device_state(self) -> list[DeviceGPUState]:
        """One sampling pass over every device; emits what should be emitted, in one event.

        Returns every reading taken in this pass (emitted or not). A device whose sample
        raises is logged (once until it recovers) and left out of this pass.

        A device whose ``emit_reason`` is a change goes out in full; one whose reason is
        "heartbeat" goes out by id only. When the pass emits anything, every other device
        whose last emission is at least ``heartbeat_s / 2`` old goes along by id too, so a
        node's devices heartbeat together. The event is ``DeviceGPUStateUpdated`` when the
        pass has exactly one full reading and no heartbeat, else one
        ``DeviceGPUStatesUpdated``. A heartbeat is remembered as the previous emitted reading
        with only ``last_update`` moved (as ``apply`` stores it), never as the current values,
        so drift below the thresholds adds up until it is emitted.
        """
        devices = await self._refresh_device_info()
        readings: list[DeviceGPUState] = []
        for info in devices:
            device_id = info.device_id
            try:
                state = await self.gpu_backend.sample(self.node_id, device_id)
            except Exception as error:
                if device_id not in self._failing_devices:
                    self._failing_devices.add(device_id)
                    logger.warning(
                        f"GPU telemetry: reading {device_id} failed ({error!r}); "
                        "retrying every tick"
                    )
                continue
            if device_id in self._failing_devices:
                self._failing_devices.discard(device_id)
                logger.info(f"GPU telemetry: reading {device_id} works again")
            state = self._with_utilization_median(state)
            state = self._with_condition_changes(state)
            readings.append(state)
            self._last_readings[device_id] = state
        await self._emit_due(readings, self._clock())
        return readings

    async def _emit_due(self, readings: list[DeviceGPUState], now: datetime) -> None:
        """Emit this pass's due readings as one event (see ``collect_device_state``)."""
        changed: list[DeviceGPUState] = []
        unchanged: list[tuple[DeviceGPUState, bool]] = []  # (previous emitted, heartbeat due)
        for state in readings:
            previous = self._last_emitted.get(state.device_id)
            reason = emit_reason(previous, state, now, self.config)
            if reason is not None:
                logger.trace(f"GPU telemetry: emitting {state.device_id} ({reason})")
            if previous is not None and reason in (None, "heartbeat"):
                unchanged.append((previous, reason == "heartbeat"))
            elif reason is not None:  # a change, or the first reading
                changed.append(state)
        if not changed and not any(due for _, due in unchanged):
            return
        align_after_s = self.config.heartbeat_s / 2
        heartbeats = [
            previous
            for previous, due in unchanged
            if due or (now - previous.last_update).total_seconds() >= align_after_s
        ]
        event: Event
        if len(changed) == 1 and not heartbeats:
            event = DeviceGPUStateUpdated(device_state=changed[0], origin_node_id=self.node_id)
        else:
            event = DeviceGPUStatesUpdated(
                node_id=self.node_id,
                device_states=changed,
                unchanged_device_ids=[previous.device_id for previous in heartbeats],
                sampled_at=now,
                origin_node_id=self.node_id,
            )
        if not await self._emit(event):
            return  # nothing is marked emitted: the next pass tries again
        for state in changed:
            self._last_emitted[state.device_id] = state
        for previous in heartbeats:
            if now > previous.last_update:
                previous = previous.model_copy(update={"last_update": now})
            self._last_emitted[previous.device_id] = previous

    def _with_condition_changes(self, state: DeviceGPUState) -> DeviceGPUState:
        """``state`` with its ``condition_changes``: the previous sample's, plus one when
        its throttling or power state differs from that sample's."""
        previous = self._last_readings.get(state.device_id)
        if previous is None:
            return state
        changed = (state.is_thermal_throttling, state.is_plugged_in) != (
            previous.is_thermal_throttling,
            previous.is_plugged_in,
        )
        return state.model_copy(
            update={"condition_changes": previous.condition_changes + int(changed)}
        )

    def _with_utilization_median(self, state: DeviceGPUState) -> DeviceGPUState:
        """``state`` with the median of the device's recent utilisation samples filled in."""
        samples = self._utilization_samples.get(state.device_id)
        if samples is None:
            samples = deque(maxlen=UTILIZATION_MEDIAN_WINDOW)
            self._utilization_samples[state.device_id] = samples
        samples.append(state.compute_utilization_percent)
        return state.model_copy(
            update={"utilization_median_percent": float(statistics.median(samples))}
        )

    async def _monitoring_loop(self) -> None:
        """Run ``collect_device_state`` every ``interval_s`` (fixed rate) until cancelled."""
        interval = self.config.interval_s
        next_tick = anyio.current_time()
        while True:
            try:
                await self.collect_device_state()
            except Exception:
                logger.opt(exception=True).warning("GPU telemetry pass failed; retrying next tick")
            next_tick += interval
            now = anyio.current_time()
            if next_tick < now:  # fell behind (a slow pass): skip the missed ticks
                next_tick = now
            await anyio.sleep(next_tick - now)

    async def _refresh_device_info(self) -> list[GPUDeviceInfo]:
        """List devices and report facts not reported yet (or changed since)."""
        try:
            devices = await self.gpu_backend.list_devices(self.node_id)
        except Exception as error:
            if not self._listing_failed:
                self._listing_failed = True
                logger.warning(f"GPU telemetry: listing devices failed ({error!r})")
            return list(self._reported_info.values())
        self._listing_failed = False
        # Forget devices that are gone, including ones whose facts never went out (the emitter
        # refused them) and ones that were failing: a device that comes back starts afresh.
        known_ids = (
            self._reported_info.keys()
            | self._last_readings.keys()
            | self._utilization_samples.keys()
            | self._failing_devices
        )
        for device_id in known_ids - {info.device_id for info in devices}:
            self._reported_info.pop(device_id, None)
            self._last_emitted.pop(device_id, None)
            self._last_readings.pop(device_id, None)
            self._utilization_samples.pop(device_id, None)
            self._failing_devices.discard(device_id)
        for info in devices:
            if self._reported_info.get(info.device_id) == info:
                continue
            event = GPUDeviceInfoReported(device_info=info, origin_node_id=self.node_id)
            if await self._emit(event):
                self._reported_info[info.device_id] = info
        return devices

    async def _emit(self, event: Event) -> bool:
        try:
            await self.event_emitter(event)
        except Exception as error:
            logger.warning(f"GPU telemetry: could not emit {event.kind} ({error!r})")
            return False
        return True

    async def _shutdown_backend(self) -> None:
        try:
            await self.gpu_backend.shutdown()
        except Exception as error:
            logger.warning(f"GPU backend {self.gpu_backend.name!r} failed to shut down: {error}")
