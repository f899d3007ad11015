"""Re-placement: instances that heal when they lose a shard and move when a fresh placement
is clearly faster, decided by the master with the same placement as ``POST /instance``.

**Heal.** When the serving set breaks (a shard's node left the cluster, or its runner
failed), the master places the model again on the live devices, leaving out the devices
where the instance's runners just failed, and the new set loads. Requests the broken set
was generating fail with an error; requests that had not started wait and move to the new
set. If the model no longer fits, the instance is marked failed with the reason (and healed
later if devices come back).

**Move.** With ``rebalance: auto``, while the instance serves and nothing else is changing,
the master predicts its layout under the cluster's conditions now (throttling, load,
calibration) against a fresh placement. When the fresh one saves at least ``move_margin``
of the time per token for ``move_sustain_s`` without a break (noise does not move it), and
the instance has moved fewer than ``max_moves_per_hour`` times in the last hour, the move
starts: make before break.

**Make before break.** The new set (``Instance.incoming``) loads beside the serving one. It
must fit in the memory free now, beside the serving copy, because the placement is made on
the cluster as it is. When every new runner is ready, ``InstanceReplaced`` switches: new
requests go to the new set; the old set (``retiring_shards``) finishes the requests bound to
it and stops. A change whose runners fail or do not load within ``load_timeout_s`` is
aborted and the serving set goes on.

Every step is an event in the log (``InstanceReplacementStarted``, ``InstanceReplaced``,
``InstanceReplacementAborted``, ``InstanceFailed``); ``Instance.changes`` keeps each change
with its reason, old and new layouts and predicted gain.
"""

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import anyio
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field

from exo.master.placement import predict_instance
from exo.master.planning import plan_instance
from exo.models.cards import get_model_card
from exo.shared.event_log import LogWriteError
from exo.shared.event_store import EventStore
from exo.shared.runner_sets import instance_health, set_breakage, set_ready
from exo.shared.types.commands import CommandResult, PlaceInstance
from exo.shared.types.events import (
    Event,
    InstanceFailed,
    InstanceReplaced,
    InstanceReplacementAborted,
    InstanceReplacementStarted,
)
from exo.shared.types.ids import DeviceId, InstanceId, NodeId
from exo.shared.types.instances import (
    ChangeKind,
    Instance,
    PlacementChange,
    Replacement,
    Shard,
)
from exo.shared.types.runners import RunnerState
from exo.shared.types.state import State

HOUR = timedelta(hours=1)
COALESCE_S = 0.25
"""The rebalancer looks at the state this long after a change, taking a burst at once."""
FAILED_DEVICE_MEMORY = timedelta(minutes=10)
"""A device where a runner of the instance failed is left out of its heals this long."""


class ReplacementConfig(BaseModel):
    """When the master heals and moves instances (``exo --help`` lists the flags)."""

    model_config = ConfigDict(frozen=True)

    move_margin: float = Field(default=0.25, gt=0, lt=1)
    """A move needs a fresh placement predicted to save at least this share of the time
    per token (0.25: 25 % less)."""
    move_sustain_s: float = Field(default=10.0, ge=0)
    """...continuously for this long (telemetry noise and brief spikes do not move it)."""
    max_moves_per_hour: int = Field(default=4, ge=0)
    """Moves per instance in any hour (heals and manual replacements are not counted)."""
    max_heals_per_hour: int = Field(default=10, ge=1)
    """Beyond this many heals in an hour the instance is marked failed instead."""
    settle_s: float = Field(default=30.0, ge=0)
    """After a change ends, no move is considered for this long (its new runners are
    measured and calibrated first)."""
    load_timeout_s: float = Field(default=300.0, gt=0)
    """A change whose runners are not all ready after this long is aborted."""
    check_interval_s: float = Field(default=1.0, gt=0)
    heal_retry_s: float = Field(default=10.0, gt=0)
    """A failed instance is tried again this often (devices may have come back)."""


# --- decisions (pure) ----------------------------------------------------------------------
def _layout(shards: list[Shard]) -> list[tuple[NodeId, DeviceId, int, int]]:
    return [
        (shard.node_id, shard.device_id, shard.start_layer, shard.end_layer)
        for shard in sorted(shards, key=lambda shard: shard.rank)
    ]


def describe_layout(shards: list[Shard]) -> str:
    return ", ".join(
        f"{shard.node_id}/{shard.device_id} layers {shard.start_layer}-{shard.end_layer}"
        for shard in sorted(shards, key=lambda shard: shard.rank)
    )


def excluded_devices(
    instance: Instance, state: State, now: datetime
) -> dict[tuple[NodeId, DeviceId], str]:
    """Devices a heal leaves out: where a runner of the serving set failed on a live node,
    or a recent change's runner failed."""
    excluded = {
        (shard.node_id, shard.device_id): f"its runner failed: {runner.error}"
        for shard, runner in _failed_runners(state, instance.shards)
    }
    for change in instance.changes:
        if change.finished_at is not None and now - change.finished_at < FAILED_DEVICE_MEMORY:
            for node_id, device_id in change.failed_devices:
                excluded.setdefault(
                    (node_id, device_id), f"a runner failed there: {change.outcome_reason}"
                )
    return excluded


class Candidate(BaseModel):
    """A fresh placement for an instance, against its layout now."""

    model_config = ConfigDict(frozen=True)

    fresh: Instance
    old_predicted_ms: float | None
    new_predicted_ms: float

    @property
    def gain(self) -> float | None:
        if self.old_predicted_ms is None or self.old_predicted_ms <= 0:
            return None
        return 1.0 - self.new_predicted_ms / self.old_predicted_ms


def fresh_placement(
    instance: Instance,
    state: State,
    excluded: dict[tuple[NodeId, DeviceId], str] | None = None,
    log_level: str = "INFO",
) -> Candidate | CommandResult:
    """The placement the instance would get now (its model, node count and objective), and
    both layouts' predictions in its objective; or the reason it cannot be placed."""
    objective = instance.placement.objective
    command = PlaceInstance(
        model_id=instance.model_id,
        min_nodes=instance.min_nodes,
        objective=objective,
        rebalance=instance.rebalance,
    )
    outcome = plan_instance(command, state, instance.instance_id, excluded, log_level)
    if isinstance(outcome, CommandResult):
        return outcome
    card = get_model_card(instance.model_id)
    old = predict_instance(instance, state, card, objective=objective) if card else None
    decision = outcome.placement
    new = (
        decision.predicted_bottleneck_ms
        if objective == "throughput" and decision.predicted_bottleneck_ms is not None
        else decision.predicted_ms_per_token
    )
    return Candidate(fresh=outcome, old_predicted_ms=old, new_predicted_ms=new)


def same_layout(candidate: Candidate, instance: Instance) -> bool:
    return _layout(candidate.fresh.shards) == _layout(instance.shards)


def replacement_started(
    instance: Instance, candidate: Candidate, kind: ChangeKind, reason: str, now: datetime
) -> InstanceReplacementStarted:
    fresh = candidate.fresh
    change = PlacementChange(
        change_id=str(uuid.uuid4()),
        kind=kind,
        reason=reason,
        old_shards=instance.shards,
        new_shards=fresh.shards,
        old_predicted_ms=candidate.old_predicted_ms,
        new_predicted_ms=candidate.new_predicted_ms,
        predicted_gain=candidate.gain,
        started_at=now,
    )
    return InstanceReplacementStarted(
        instance_id=instance.instance_id,
        replacement=Replacement(
            change=change,
            shards=fresh.shards,
            ring_endpoints=fresh.ring_endpoints,
            placement=fresh.placement,
        ),
    )


def manual_replacement(instance: Instance, state: State) -> list[Event] | CommandResult:
    """``POST /instance/{id}/replace``: a fresh decision now, whatever the margin and the
    hourly limit. No events when it gives the layout the instance has and it serves."""
    if instance.incoming is not None:
        return CommandResult(
            ok=False,
            status_code=409,
            error=f"instance {instance.instance_id} is already changing "
            f"({instance.incoming.change.kind}: {instance.incoming.change.reason})",
        )
    now = datetime.now(UTC)
    broken = set_breakage(state, instance.shards)
    candidate = fresh_placement(
        instance, state, excluded_devices(instance, state, now) if broken else None
    )
    if isinstance(candidate, CommandResult):
        return candidate
    if broken is None and same_layout(candidate, instance):
        return []
    gain = candidate.gain
    reason = "requested through POST /instance/{id}/replace" + (
        f" (predicted gain {gain:.0%})" if gain is not None else ""
    )
    return [replacement_started(instance, candidate, "manual", reason, now)]


def _recent(instance: Instance, kind: ChangeKind, now: datetime) -> int:
    return sum(
        1 for change in instance.changes if change.kind == kind and now - change.started_at < HOUR
    )


def _failed_runners(state: State, shards: list[Shard]) -> Iterator[tuple[Shard, RunnerState]]:
    """The shards whose runner failed on a node still in the cluster (the device, not a
    lost node, is to blame), with that runner."""
    for shard in shards:
        runner = state.runners.get(shard.runner_id)
        if shard.node_id in state.nodes and runner is not None and runner.status == "failed":
            yield shard, runner


def _failed_devices(state: State, shards: list[Shard]) -> list[tuple[NodeId, DeviceId]]:
    return [(shard.node_id, shard.device_id) for shard, _ in _failed_runners(state, shards)]


def progress_of_change(
    instance: Instance, state: State, now: datetime, config: ReplacementConfig
) -> Event | None:
    """The event that ends the change in progress, if it is time: switch when the new set
    is ready, abort when it broke or took too long."""
    incoming = instance.incoming
    if incoming is None:
        return None
    change_id = incoming.change.change_id
    if set_ready(state, incoming.shards):
        return InstanceReplaced(instance_id=instance.instance_id, change_id=change_id)
    broken = set_breakage(state, incoming.shards)
    if broken is None and now - incoming.change.started_at > timedelta(
        seconds=config.load_timeout_s
    ):
        broken = f"its runners were not all ready after {config.load_timeout_s:.0f} s"
    if broken is None:
        return None
    return InstanceReplacementAborted(
        instance_id=instance.instance_id,
        change_id=change_id,
        reason=broken,
        failed_devices=_failed_devices(state, incoming.shards),
    )


def heal(
    instance: Instance, state: State, now: datetime, config: ReplacementConfig
) -> Event | None:
    """A heal for a broken serving set, or the instance marked failed (None: nothing new
    to say)."""
    broken = set_breakage(state, instance.shards)
    if broken is None or instance.incoming is not None or instance.rebalance == "off":
        return None
    if _recent(instance, "heal", now) >= config.max_heals_per_hour:
        reason = (
            f"{broken}; it was healed {config.max_heals_per_hour} times in the last hour, so "
            "it is not healed again (POST /instance/{id}/replace tries once more)"
        )
        return _failed(instance, reason)
    candidate = fresh_placement(instance, state, excluded_devices(instance, state, now))
    if isinstance(candidate, CommandResult):
        return _failed(instance, f"{broken}; it cannot be placed again: {candidate.error}")
    return replacement_started(instance, candidate, "heal", broken, now)


def _failed(instance: Instance, reason: str) -> InstanceFailed | None:
    if instance.failure == reason:
        return None
    return InstanceFailed(instance_id=instance.instance_id, reason=reason)


def move_candidate(
    instance: Instance, state: State, now: datetime, config: ReplacementConfig
) -> Candidate | None:
    """A fresh placement that beats the instance's layout by the margin now (None: no move
    is due: not allowed, not serving, or not enough faster)."""
    if instance.rebalance != "auto" or instance.incoming is not None:
        return None
    if instance.retiring_shards or instance.failure is not None:
        return None
    if instance_health(state, instance)[0] != "ready":
        return None
    if _recent(instance, "move", now) >= config.max_moves_per_hour:
        return None
    finished = [change.finished_at for change in instance.changes if change.finished_at]
    if finished and now - max(finished) < timedelta(seconds=config.settle_s):
        return None
    candidate = fresh_placement(instance, state, log_level="DEBUG")  # asked every second
    if isinstance(candidate, CommandResult) or same_layout(candidate, instance):
        return None
    gain = candidate.gain
    return candidate if gain is not None and gain >= config.move_margin else None


def move_reason(instance: Instance, candidate: Candidate, sustained_s: float) -> str:
    gain = candidate.gain or 0.0
    return (
        f"a fresh placement is predicted {gain:.0%} faster "
        f"({candidate.new_predicted_ms:.2f} against {candidate.old_predicted_ms or 0:.2f} ms "
        f"in its {instance.placement.objective} objective) for {sustained_s:.0f} s: "
        f"{describe_layout(candidate.fresh.shards)}"
    )


# --- the master's loop ---------------------------------------------------------------------
class Rebalancer:
    """Runs on the master: ends changes, heals and moves, one instance step at a time."""

    def __init__(
        self,
        store: EventStore,
        index: Callable[[Event], int],
        is_active: Callable[[], bool],
        config: ReplacementConfig,
    ) -> None:
        self._store = store
        self._index = index
        self._is_active = is_active
        self.config = config
        self._gain_since: dict[InstanceId, datetime] = {}
        self._heal_tried: dict[InstanceId, datetime] = {}

    async def run(self) -> None:
        decided_on: State | None = None
        decided_at = 0.0
        while True:
            # On every change of the state (a burst coalesced), and at least every interval:
            # a move's sustain time must see every reading in between, or a condition that
            # flips in step with a fixed check would look steady.
            changed = self._store.changed
            with anyio.move_on_after(self.config.check_interval_s):
                await changed.wait()
            await anyio.sleep(COALESCE_S)
            if not self._is_active():
                self._gain_since.clear()
                continue
            state = self._store.state
            since = anyio.current_time() - decided_at
            if _same_but_index(state, decided_on) and since < self.config.check_interval_s:
                continue  # only events that change nothing (a stream's chunks): same answers
            if decided_on is not None and condition_flipped_unseen(decided_on, state):
                if self._gain_since:
                    logger.info(
                        "a device's throttling or power went and came back since the last "
                        "decision: a pending move's sustain time starts again"
                    )
                self._gain_since.clear()
            decided_on, decided_at = state, anyio.current_time()
            for instance_id in list(state.instances):
                await self._step(instance_id)

    async def _step(self, instance_id: InstanceId) -> None:
        state = self._store.state
        instance = state.instances.get(instance_id)
        if instance is None:
            return
        now = datetime.now(UTC)
        event = progress_of_change(instance, state, now, self.config)
        if event is None and set_breakage(state, instance.shards) is not None:
            self._gain_since.pop(instance_id, None)
            tried = self._heal_tried.get(instance_id)
            retry = timedelta(seconds=self.config.heal_retry_s)
            if instance.failure is not None and tried is not None and now - tried < retry:
                return
            self._heal_tried[instance_id] = now
            event = await anyio.to_thread.run_sync(heal, instance, state, now, self.config)
        elif event is None:
            event = await self._move(instance, state, now)
        if event is None or not self._is_active():
            return
        if self._store.state.instances.get(instance_id) != instance:
            return  # it changed while we decided; decide again on the next round
        try:
            self._index(event)
        except LogWriteError:
            return  # the store logged it; tried again on the next round
        _log(instance, event)

    async def _move(self, instance: Instance, state: State, now: datetime) -> Event | None:
        candidate = await anyio.to_thread.run_sync(
            move_candidate, instance, state, now, self.config
        )
        instance_id = instance.instance_id
        if candidate is None:
            self._gain_since.pop(instance_id, None)
            return None
        since = self._gain_since.setdefault(instance_id, now)
        sustained = (now - since).total_seconds()
        if sustained < self.config.move_sustain_s:
            return None
        del self._gain_since[instance_id]
        reason = move_reason(instance, candidate, sustained)
        return replacement_started(instance, candidate, "move", reason, now)


def condition_flipped_unseen(before: State, after: State) -> bool:
    """Whether some device's throttling or power state changed twice or more between the
    rebalancer's decisions on ``before`` and on ``after`` (its ``condition_changes``): a
    condition that went and came back in between, which a move's sustain time must not take
    for a steady one. Under load a decision can take longer than a flip, and the worker
    sends only a device's newest reading, so every decision may see the same phase."""
    for node_id, readings in after.gpu_device_state.items():
        earlier = before.gpu_device_state.get(node_id, {})
        for device_id, reading in readings.items():
            previous = earlier.get(device_id)
            if previous is not None and reading.condition_changes - previous.condition_changes >= 2:
                return True
    return False


def _same_but_index(state: State, earlier: State | None) -> bool:
    """Whether only the applied index moved since ``earlier`` (every field an event did not
    touch is the same object, so this compares a few references)."""
    if earlier is None:
        return False
    update = {"last_event_applied_idx": earlier.last_event_applied_idx}
    return state.model_copy(update=update) == earlier


def _log(instance: Instance, event: Event) -> None:
    name = f"instance {instance.instance_id} ({instance.model_id})"
    match event:
        case InstanceReplacementStarted():
            change = event.replacement.change
            gain = f", predicted gain {change.predicted_gain:.0%}" if change.predicted_gain else ""
            logger.info(
                f"{change.kind} of {name} started: {change.reason}{gain}; loading "
                f"[{describe_layout(change.new_shards)}]"
            )
        case InstanceReplaced():
            logger.info(f"{name} switched to its new runners")
        case InstanceReplacementAborted():
            logger.warning(f"change of {name} aborted: {event.reason}")
        case InstanceFailed():
            logger.error(f"{name} failed: {event.reason}")
        case _:
            pass
