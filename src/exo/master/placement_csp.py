"""The placement cost model and ``ConstraintSatisfactionPlacement``, the solver used when
the candidate devices differ.

Everything here is pure: values in, values out. ``placement.py`` builds the candidate
devices from the cluster state, decides between the greedy split and this solver, and turns
the result into shards. See docs/placement.md for the model with worked numbers.

Decision: an ordered list of pipeline stages (devices) with a contiguous layer range each.

Cost (predicted milliseconds per generated token, decode is memory-bound)::

    Σ_stages  stage_bytes / effective_bandwidth
  + Σ_hops    latency + activation_bytes / link_bandwidth

where the hops are the consecutive stages *and* the ring closure from the last stage back
to the first (the sampled token returns to rank 0 before the next token can start). A
single-stage placement has no hops.

Solver: an exact dynamic programme over the devices (grouped by node) whose state is
(layers placed so far, which of the first/last roles are taken, nodes used, whether the
current node is already used). With uniform inter-node link costs (always the case when
nothing is measured) the hop cost of the best ring order depends only on how many devices
and nodes are used, so the programme is exact over every subset, order and split. With
measured non-uniform links the programme uses each node's cheapest incoming link (a lower
bound), then orders the chosen nodes exactly (Held–Karp, up to 8 intermediate nodes) or by
nearest neighbour; the result carries its lower bound, so the optimality gap is known.
"""

import math
import time
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from exo.shared.types.gpu import UNKNOWN_TEMPERATURE_C
from exo.shared.types.ids import DeviceId, NodeId
from exo.shared.types.models import ModelCard

DeviceKey = tuple[NodeId, DeviceId]

FloatArray = NDArray[np.float64]


class PlacementDevice(BaseModel):
    """One candidate device: static facts joined with its latest live reading."""

    model_config = ConfigDict(frozen=True)

    node_id: NodeId
    device_id: DeviceId
    name: str
    vendor: str
    backend: str
    memory_total_bytes: int = Field(ge=0)
    memory_free_bytes: int = Field(ge=0)
    memory_bandwidth_gbps: float = Field(gt=0)
    peak_tflops_fp16: float = Field(ge=0)
    utilization_percent: float = Field(default=0.0, ge=0, le=100)
    temperature_c: float = UNKNOWN_TEMPERATURE_C
    throttle_threshold_c: float = 100.0
    is_thermal_throttling: bool = False
    battery_percent: float = Field(default=100.0, ge=0, le=100)
    is_plugged_in: bool = True
    is_cpu_fallback: bool = False
    """True for a node without GPU state that offers its CPU and RAM."""
    has_static_info: bool = True
    """False when the node has not reported the device's static facts (name, bandwidth…)."""

    @property
    def key(self) -> DeviceKey:
        return (self.node_id, self.device_id)

    @property
    def label(self) -> str:
        return f"{self.node_id}/{self.device_id} ({self.name})"

    @property
    def temperature_known(self) -> bool:
        return self.temperature_c > UNKNOWN_TEMPERATURE_C

    @property
    def is_hot(self) -> bool:
        """Thermally throttling, or at or past its throttle threshold."""
        return self.is_thermal_throttling or (
            self.temperature_known and self.temperature_c >= self.throttle_threshold_c
        )


class LinkCost(BaseModel):
    model_config = ConfigDict(frozen=True)

    latency_ms: float = Field(ge=0)
    bandwidth_mbps: float = Field(gt=0)


class CostModelConfig(BaseModel):
    """Every constant of the cost model, with its default. Documented in docs/placement.md."""

    model_config = ConfigDict(frozen=True)

    utilization_derate: float = Field(default=0.8, ge=0, lt=1)
    """Effective bandwidth × (1 − utilization_derate × utilisation)."""
    throttling_factor: float = Field(default=0.5, gt=0, le=1)
    """Bandwidth factor of a device that throttles or is past its throttle threshold."""
    near_threshold_margin_c: float = Field(default=5.0, ge=0)
    near_threshold_factor: float = Field(default=0.8, gt=0, le=1)
    """Bandwidth factor within ``near_threshold_margin_c`` of the throttle threshold."""
    memory_headroom_fraction: float = Field(default=0.05, ge=0, lt=1)
    """Kept free on every device, as a fraction of its total memory."""
    low_battery_percent: float = Field(default=20.0, ge=0, le=100)
    """An unplugged device below this charge is excluded while others suffice."""
    local_link: LinkCost = LinkCost(latency_ms=0.05, bandwidth_mbps=100_000.0)
    """Between two devices of one node."""
    default_link: LinkCost = LinkCost(latency_ms=1.0, bandwidth_mbps=1_000.0)
    """Between two nodes when no measurement exists (a plain gigabit LAN)."""


class StagePlan(BaseModel):
    """One pipeline stage before it becomes a Shard: a device and how many layers it runs."""

    model_config = ConfigDict(frozen=True)

    device: PlacementDevice
    n_layers: int = Field(ge=1)


def exclusion_reason(device: PlacementDevice, config: CostModelConfig) -> str | None:
    """Why ``device`` should be left out while a placement without it exists, or None."""
    if device.is_thermal_throttling:
        return f"{device.label} is thermally throttling"
    if device.temperature_known and device.temperature_c >= device.throttle_threshold_c:
        return (
            f"{device.label} is at {device.temperature_c:.0f} °C, past its throttle "
            f"threshold of {device.throttle_threshold_c:.0f} °C"
        )
    if not device.is_plugged_in and device.battery_percent < config.low_battery_percent:
        return (
            f"{device.label} is on battery at {device.battery_percent:.0f} % "
            f"(below {config.low_battery_percent:.0f} %)"
        )
    return None


def thermal_factor(device: PlacementDevice, config: CostModelConfig) -> float:
    """1.0 when cool; ``near_threshold_factor`` close to the threshold; ``throttling_factor``
    when throttling or past the threshold."""
    if device.is_hot:
        return config.throttling_factor
    if (
        device.temperature_known
        and device.temperature_c >= device.throttle_threshold_c - config.near_threshold_margin_c
    ):
        return config.near_threshold_factor
    return 1.0


def usable_bytes(device: PlacementDevice, config: CostModelConfig) -> int:
    """Free memory less the headroom kept on every device (a fraction of its total)."""
    headroom = math.ceil(device.memory_total_bytes * config.memory_headroom_fraction)
    return max(0, device.memory_free_bytes - headroom)


def effective_bandwidth_gbps(device: PlacementDevice, config: CostModelConfig) -> float:
    """Peak bandwidth × (1 − derate × utilisation) × thermal factor."""
    utilisation = device.utilization_percent / 100.0
    busy_factor = 1.0 - config.utilization_derate * utilisation
    return device.memory_bandwidth_gbps * busy_factor * thermal_factor(device, config)


class CostModel(BaseModel):
    """Predicted ms per token and memory fit; the one place both greedy and CSP use."""

    model_config = ConfigDict(frozen=True)

    model_card: ModelCard
    config: CostModelConfig = CostModelConfig()
    links: dict[NodeId, dict[NodeId, LinkCost]] = Field(default_factory=dict)
    """Measured links, source node -> destination node."""

    # --- bytes -------------------------------------------------------------------------
    @property
    def first_extra_bytes(self) -> int:
        """Embeddings: the first stage holds half of the non-layer bytes."""
        return self.model_card.non_layer_bytes // 2

    @property
    def last_extra_bytes(self) -> int:
        """Final norm and LM head: the last stage holds the other half."""
        return self.model_card.non_layer_bytes - self.first_extra_bytes

    def stage_bytes(self, n_layers: int, is_first: bool, is_last: bool) -> int:
        return (
            n_layers * self.model_card.layer_bytes
            + (self.first_extra_bytes if is_first else 0)
            + (self.last_extra_bytes if is_last else 0)
        )

    def kv_cache_bytes(self, n_layers: int) -> int:
        card = self.model_card
        total = card.context_length * card.kv_cache_bytes_per_token
        return -(-total * n_layers // card.n_layers)

    def memory_needed(self, n_layers: int, is_first: bool, is_last: bool) -> int:
        """Bytes a stage occupies: its weights plus the KV cache for the whole context."""
        return self.stage_bytes(n_layers, is_first, is_last) + self.kv_cache_bytes(n_layers)

    def usable_bytes(self, device: PlacementDevice) -> int:
        return usable_bytes(device, self.config)

    def fits(self, device: PlacementDevice, n_layers: int, is_first: bool, is_last: bool) -> bool:
        return self.memory_needed(n_layers, is_first, is_last) <= self.usable_bytes(device)

    def max_layers(self, device: PlacementDevice, is_first: bool, is_last: bool) -> int:
        """The most layers ``device`` can hold in this role (0 when not even one fits)."""
        card = self.model_card
        usable = self.usable_bytes(device)
        extras = (self.first_extra_bytes if is_first else 0) + (
            self.last_extra_bytes if is_last else 0
        )
        per_layer = card.layer_bytes + card.context_length * card.kv_cache_bytes_per_token / (
            card.n_layers
        )
        estimate = max(0, min(card.n_layers, int((usable - extras) // per_layer)))
        while estimate > 0 and not self.fits(device, estimate, is_first, is_last):
            estimate -= 1
        while estimate < card.n_layers and self.fits(device, estimate + 1, is_first, is_last):
            estimate += 1
        return estimate

    # --- time --------------------------------------------------------------------------
    def effective_bandwidth_gbps(self, device: PlacementDevice) -> float:
        return effective_bandwidth_gbps(device, self.config)

    def ms_for_bytes(self, device: PlacementDevice, n_bytes: int) -> float:
        """Time to stream ``n_bytes`` from device memory: bytes / (GB/s) in ms."""
        return n_bytes / (self.effective_bandwidth_gbps(device) * 1e6)

    def stage_ms(
        self, device: PlacementDevice, n_layers: int, is_first: bool, is_last: bool
    ) -> float:
        return self.ms_for_bytes(device, self.stage_bytes(n_layers, is_first, is_last))

    def link(self, source: NodeId, destination: NodeId) -> LinkCost:
        if source == destination:
            return self.config.local_link
        measured = self.links.get(source, {}).get(destination)
        return measured if measured is not None else self.config.default_link

    def link_ms(self, source: NodeId, destination: NodeId) -> float:
        link = self.link(source, destination)
        hop_bits = self.model_card.hop_bytes_per_token * 8
        return link.latency_ms + hop_bits / (link.bandwidth_mbps * 1e3)

    def hop_ms(self, source: PlacementDevice, destination: PlacementDevice) -> float:
        return self.link_ms(source.node_id, destination.node_id)

    def predict_ms_per_token(self, stages: Sequence[StagePlan]) -> float:
        """Σ stage times + Σ hops between consecutive stages, ring closure included."""
        total = 0.0
        last_index = len(stages) - 1
        for index, stage in enumerate(stages):
            total += self.stage_ms(stage.device, stage.n_layers, index == 0, index == last_index)
        if len(stages) > 1:
            for index, stage in enumerate(stages):
                following = stages[(index + 1) % len(stages)]
                total += self.hop_ms(stage.device, following.device)
        return total

    def violations(self, stages: Sequence[StagePlan], min_nodes: int = 1) -> list[str]:
        """Every hard constraint ``stages`` breaks (empty when the placement is valid)."""
        problems: list[str] = []
        placed = sum(stage.n_layers for stage in stages)
        if placed != self.model_card.n_layers:
            problems.append(f"{placed} layers placed, the model has {self.model_card.n_layers}")
        keys = [stage.device.key for stage in stages]
        if len(set(keys)) != len(keys):
            problems.append("a device appears in more than one stage")
        last_index = len(stages) - 1
        for index, stage in enumerate(stages):
            if stage.n_layers < 1:
                problems.append(f"{stage.device.label} has no layers")
            if not self.fits(stage.device, stage.n_layers, index == 0, index == last_index):
                problems.append(f"{stage.device.label} cannot hold {stage.n_layers} layers")
        if len({stage.device.node_id for stage in stages}) < min_nodes:
            problems.append(f"fewer than {min_nodes} nodes used")
        return problems


def greedy_stages(
    cost_model: CostModel, devices: Sequence[PlacementDevice], min_nodes: int = 1
) -> list[StagePlan] | None:
    """Today's split: the fewest devices, largest free memory first, whose memory holds the
    model (and that span ``min_nodes`` nodes), with memory-proportional contiguous layer
    ranges, at least one layer each. None when no such split exists."""
    n_layers = cost_model.model_card.n_layers
    ordered = sorted(
        devices,
        key=lambda device: (-cost_model.usable_bytes(device), device.node_id, device.device_id),
    )
    chosen: list[PlacementDevice] = []
    nodes: set[NodeId] = set()
    remaining = list(ordered)
    caps: list[int] = []  # each chosen device's layer cap in its role (alone: first and last)
    while remaining and (sum(caps) < n_layers or len(nodes) < min_nodes):
        if sum(caps) >= n_layers:
            # Memory suffices; take the largest device from a node not used yet.
            pick = next((device for device in remaining if device.node_id not in nodes), None)
            if pick is None:
                return None
        else:
            pick = remaining[0]
        remaining.remove(pick)
        chosen.append(pick)
        nodes.add(pick.node_id)
        caps = [
            cost_model.max_layers(device, index == 0, index == len(chosen) - 1)
            for index, device in enumerate(chosen)
        ]
    if len(chosen) > n_layers or sum(caps) < n_layers or len(nodes) < min_nodes:
        return None
    weights = [max(1, cost_model.usable_bytes(device)) for device in chosen]
    counts = _proportional_counts(n_layers, weights, caps)
    if counts is None:
        return None
    return [
        StagePlan(device=device, n_layers=count)
        for device, count in zip(chosen, counts, strict=True)
    ]


def _proportional_counts(
    total: int, weights: Sequence[int], caps: Sequence[int]
) -> list[int] | None:
    """Largest-remainder split of ``total`` proportional to ``weights``, each in [1, cap]."""
    if any(cap < 1 for cap in caps) or sum(caps) < total or len(weights) > total:
        return None
    weight_sum = sum(weights)
    ideal = [total * weight / weight_sum for weight in weights]
    counts = [min(cap, max(1, math.floor(share))) for share, cap in zip(ideal, caps, strict=True)]
    order = sorted(range(len(counts)), key=lambda index: (-(ideal[index] - counts[index]), index))
    while sum(counts) < total:
        progressed = False
        for index in order:
            if sum(counts) >= total:
                break
            if counts[index] < caps[index]:
                counts[index] += 1
                progressed = True
        if not progressed:
            return None
    while sum(counts) > total:
        index = max(
            (index for index in range(len(counts)) if counts[index] > 1),
            key=lambda index: (counts[index] - ideal[index], -index),
        )
        counts[index] -= 1
    return counts


class SolveResult(BaseModel):
    """What the solver found; ``stages`` empty when nothing fits."""

    model_config = ConfigDict(frozen=True)

    stages: list[StagePlan]
    predicted_ms_per_token: float | None
    lower_bound_ms_per_token: float | None
    proven_optimal: bool
    timed_out: bool
    used_fallback: bool
    solve_ms: float
    reasons: list[str] = Field(default_factory=list)


class _BudgetExhaustedError(Exception):
    pass


_ROLE_MIDDLE = 0
_ROLE_FIRST = 1
_ROLE_LAST = 2


class _Candidate(BaseModel):
    model_config = ConfigDict(frozen=True)

    device: PlacementDevice
    node_index: int
    layer_ms: float
    first_extra_ms: float
    last_extra_ms: float
    cap_middle: int
    cap_first: int
    cap_last: int


def _window_mins(
    values: FloatArray, windows: Sequence[int], layer_ms: float
) -> dict[int, FloatArray]:
    """For each ``window`` (≥ 1): ``out[..., n] = min_{k in 1..window} values[..., n - k] +
    k * layer_ms`` (inf where n - k < 0 for every k), via one sparse table over
    ``values[..., i] - i * layer_ms`` shared by all the windows."""
    if not windows:
        return {}
    length = values.shape[-1]
    widest = max(windows)
    offsets = np.arange(length, dtype=np.float64) * layer_ms
    padding = np.full((*values.shape[:-1], widest), np.inf)
    # levels[j][..., i]: the minimum of the padded, shifted values over [i, i + 2**j).
    levels = [np.concatenate([padding, values - offsets], axis=-1)]
    while 2 ** len(levels) <= widest:
        span = 2 ** (len(levels) - 1)
        levels.append(np.minimum(levels[-1][..., :-span], levels[-1][..., span:]))
    result: dict[int, FloatArray] = {}
    for window in windows:
        # values[n - window .. n - 1] sit at padded positions widest - window + n .. widest - 1 + n.
        level = window.bit_length() - 1
        span = 1 << level
        low = widest - window
        high = widest - span
        result[window] = (
            np.minimum(
                levels[level][..., low : low + length], levels[level][..., high : high + length]
            )
            + offsets
        )
    return result


class ConstraintSatisfactionPlacement:
    """Minimise predicted ms/token over ordered device subsets and contiguous layer splits.

    Hard constraints: every layer exactly once, ≥ 1 layer per stage, each stage fits its
    device's free memory (weights + KV cache for the context + headroom), at least
    ``min_nodes`` distinct nodes, and devices with an :func:`exclusion_reason` left out
    while any placement without them exists. Deterministic for the same inputs. When the
    time budget runs out, ``fallback`` (normally the greedy split) is returned instead;
    a timeout is never an exception.
    """

    def __init__(
        self,
        cost_model: CostModel,
        devices: Sequence[PlacementDevice],
        *,
        min_nodes: int = 1,
        budget_ms: float = 100.0,
        scores: Mapping[DeviceKey, float] | None = None,
        fallback: Sequence[StagePlan] | None = None,
    ) -> None:
        self.cost_model = cost_model
        self.devices = list(devices)
        self.min_nodes = min_nodes
        self.budget_ms = budget_ms
        self.scores = dict(scores or {})
        self.fallback = list(fallback) if fallback is not None else None
        self._deadline = 0.0

    # --- public ------------------------------------------------------------------------
    def solve(self) -> SolveResult:
        started = time.perf_counter()
        self._deadline = started + self.budget_ms / 1000.0
        config = self.cost_model.config
        flagged = {device.key: exclusion_reason(device, config) for device in self.devices}
        healthy = [device for device in self.devices if flagged[device.key] is None]
        excluded_reasons = [reason for reason in flagged.values() if reason is not None]
        reasons: list[str] = []
        try:
            outcome = None
            if excluded_reasons and _node_count(healthy) >= self.min_nodes:
                outcome = self._solve_subset(healthy)
                if outcome is not None:
                    reasons.extend(f"excluded: {reason}" for reason in excluded_reasons)
            if outcome is None:
                outcome = self._solve_subset(self.devices)
                if outcome is not None and excluded_reasons:
                    used = {stage.device.key for stage in outcome[0]}
                    for device in self.devices:
                        reason = flagged[device.key]
                        if reason is not None and device.key in used:
                            reasons.append(f"used although {reason}: nothing fits without it")
        except _BudgetExhaustedError:
            return self._timed_out(started, reasons)
        solve_ms = (time.perf_counter() - started) * 1000.0
        if outcome is None:
            return SolveResult(
                stages=[],
                predicted_ms_per_token=None,
                lower_bound_ms_per_token=None,
                proven_optimal=True,
                timed_out=False,
                used_fallback=False,
                solve_ms=solve_ms,
                reasons=["no placement satisfies the memory and node constraints"],
            )
        stages, cost, lower_bound = outcome
        stages = balance_equal_stages(stages, self.cost_model)
        proven = cost <= lower_bound + 1e-9 * max(1.0, abs(cost))
        if not proven and math.isfinite(lower_bound):
            reasons.append(
                f"measured links are uneven: within {cost - lower_bound:.3f} ms/token of optimal"
            )
        elif not proven:
            reasons.append(
                "a measured link between nodes is cheaper than the link within a node: "
                "optimality not proven"
            )
        return SolveResult(
            stages=stages,
            predicted_ms_per_token=cost,
            lower_bound_ms_per_token=lower_bound,
            proven_optimal=proven,
            timed_out=False,
            used_fallback=False,
            solve_ms=solve_ms,
            reasons=reasons,
        )

    # --- internals ---------------------------------------------------------------------
    def _timed_out(self, started: float, reasons: list[str]) -> SolveResult:
        solve_ms = (time.perf_counter() - started) * 1000.0
        message = f"solver budget of {self.budget_ms:g} ms exhausted"
        fallback = self.fallback
        if fallback and not self.cost_model.violations(fallback, self.min_nodes):
            return SolveResult(
                stages=fallback,
                predicted_ms_per_token=self.cost_model.predict_ms_per_token(fallback),
                lower_bound_ms_per_token=None,
                proven_optimal=False,
                timed_out=True,
                used_fallback=True,
                solve_ms=solve_ms,
                reasons=[*reasons, f"{message}: using the fallback split"],
            )
        return SolveResult(
            stages=[],
            predicted_ms_per_token=None,
            lower_bound_ms_per_token=None,
            proven_optimal=False,
            timed_out=True,
            used_fallback=False,
            solve_ms=solve_ms,
            reasons=[*reasons, f"{message} and no fallback split was given"],
        )

    def _check_deadline(self) -> None:
        if time.perf_counter() > self._deadline:
            raise _BudgetExhaustedError

    def _order(self, devices: Sequence[PlacementDevice]) -> list[list[PlacementDevice]]:
        """Devices grouped by node; nodes and devices by score (high first), then by id."""
        by_node: dict[NodeId, list[PlacementDevice]] = {}
        for device in devices:
            by_node.setdefault(device.node_id, []).append(device)

        def score(device: PlacementDevice) -> float:
            return self.scores.get(device.key, 0.0)

        groups = [
            sorted(group, key=lambda device: (-score(device), device.device_id))
            for group in by_node.values()
        ]
        groups.sort(key=lambda group: (-max(score(device) for device in group), group[0].node_id))
        return groups

    def _solve_subset(
        self, devices: Sequence[PlacementDevice]
    ) -> tuple[list[StagePlan], float, float] | None:
        """(stages, realised cost, lower bound) of the best placement on ``devices``."""
        if _node_count(devices) < self.min_nodes or not devices:
            return None
        cost_model = self.cost_model
        groups = self._order(devices)
        best: tuple[list[StagePlan], float, float] | None = None
        n_layers = cost_model.model_card.n_layers
        if self.min_nodes <= 1:
            for group in groups:
                for device in group:
                    if cost_model.fits(device, n_layers, True, True):
                        stages = [StagePlan(device=device, n_layers=n_layers)]
                        cost = cost_model.predict_ms_per_token(stages)
                        if best is None or cost < best[1]:
                            best = (stages, cost, cost)
        self._check_deadline()
        if len(devices) >= 2 and n_layers >= 2:
            candidates = self._candidates(groups)
            node_ids = [group[0].node_id for group in groups]
            cheapest_entry, mean_entry, uniform = self._entry_costs(node_ids)
            multi = self._solve_pipeline(candidates, node_ids, cheapest_entry, uniform)
            if multi is not None and multi[1] > multi[2] + 1e-9 * max(1.0, multi[1]):
                # Uneven measured links: also plan against each node's mean incoming link
                # (a heuristic, not a bound) and keep the cheaper realised placement.
                alternative = self._solve_pipeline(candidates, node_ids, mean_entry, uniform)
                if alternative is not None and alternative[1] < multi[1]:
                    multi = (alternative[0], alternative[1], multi[2])
            if multi is not None:
                stages, cost, lower_bound = multi
                if best is None:
                    best = multi
                else:
                    overall_bound = min(best[2], lower_bound)
                    if cost < best[1]:
                        best = (stages, cost, overall_bound)
                    else:
                        best = (best[0], best[1], overall_bound)
        if best is not None and self.fallback:
            allowed = {device.key for device in devices}
            fallback = self.fallback
            if all(stage.device.key in allowed for stage in fallback) and not (
                cost_model.violations(fallback, self.min_nodes)
            ):
                fallback_cost = cost_model.predict_ms_per_token(fallback)
                if fallback_cost < best[1] - 1e-12:
                    best = (fallback, fallback_cost, best[2])
        return best

    def _candidates(self, groups: Sequence[Sequence[PlacementDevice]]) -> list[_Candidate]:
        cost_model = self.cost_model
        candidates: list[_Candidate] = []
        for node_index, group in enumerate(groups):
            for device in group:
                candidates.append(
                    _Candidate(
                        device=device,
                        node_index=node_index,
                        layer_ms=cost_model.ms_for_bytes(device, cost_model.model_card.layer_bytes),
                        first_extra_ms=cost_model.ms_for_bytes(
                            device, cost_model.first_extra_bytes
                        ),
                        last_extra_ms=cost_model.ms_for_bytes(device, cost_model.last_extra_bytes),
                        cap_middle=cost_model.max_layers(device, False, False),
                        cap_first=cost_model.max_layers(device, True, False),
                        cap_last=cost_model.max_layers(device, False, True),
                    )
                )
        return candidates

    def _entry_costs(self, node_ids: Sequence[NodeId]) -> tuple[list[float], list[float], bool]:
        """Per node: its cheapest and its mean incoming inter-node link cost (the local link
        for a lone node), and whether every inter-node link costs the same."""
        cost_model = self.cost_model
        local_ms = cost_model.link_ms(node_ids[0], node_ids[0])
        cheapest: list[float] = []
        mean: list[float] = []
        inter_costs: list[float] = []
        for destination in node_ids:
            incoming = [
                cost_model.link_ms(source, destination)
                for source in node_ids
                if source != destination
            ]
            inter_costs.extend(incoming)
            cheapest.append(min(incoming, default=local_ms))
            mean.append(sum(incoming) / len(incoming) if incoming else local_ms)
        uniform = not inter_costs or (
            max(inter_costs) - min(inter_costs) <= 1e-12 * max(inter_costs)
        )
        return cheapest, mean, uniform

    def _solve_pipeline(
        self,
        candidates: Sequence[_Candidate],
        node_ids: Sequence[NodeId],
        entry_ms: Sequence[float],
        uniform: bool,
    ) -> tuple[list[StagePlan], float, float] | None:
        """The exact programme over ≥ 2 stages, charging a node ``entry_ms[node]`` for the
        inter-node link into it. State per layer count ``n``:
        ``[roles taken (bit 0 first, bit 1 last), nodes used (capped), current node used]``.
        """
        cost_model = self.cost_model
        n_layers = cost_model.model_card.n_layers
        local_ms = cost_model.link_ms(node_ids[0], node_ids[0])
        min_entry = min(entry_ms)
        max_nodes = max(2, self.min_nodes)
        entry_adds = [self._entry_add(entry, min_entry, local_ms, max_nodes) for entry in entry_ms]

        shape = (4, max_nodes + 1, 2, n_layers + 1)
        values = np.full(shape, np.inf)
        values[0, 0, 0, 0] = 0.0
        history: list[FloatArray] = []
        merged_from: dict[int, FloatArray] = {}
        previous_node = -1
        for index, candidate in enumerate(candidates):
            self._check_deadline()
            if candidate.node_index != previous_node:
                previous_node = candidate.node_index
                merged_from[index] = values
                values = values.copy()
                values[:, :, 0, :] = np.minimum(values[:, :, 0, :], values[:, :, 1, :])
                values[:, :, 1, :] = np.inf
            history.append(values)
            updated = values.copy()
            entry_add = entry_adds[candidate.node_index]
            roles = [
                (bit, min(cap, n_layers), extra)
                for _role, bit, cap, extra in self._roles(candidate)
                if cap >= 1
            ]
            reached_by_window = _window_mins(
                values, [window for _bit, window, _extra in roles], candidate.layer_ms
            )
            for bit, window, extra in roles:
                reached = reached_by_window[window]
                for roles_taken in range(4):
                    if roles_taken & bit:
                        continue
                    target = roles_taken | bit
                    same_node = reached[roles_taken, :, 1, :] + (extra + local_ms)
                    np.minimum(updated[target, :, 1, :], same_node, out=updated[target, :, 1, :])
                    new_node = (
                        reached[roles_taken, :, 0, :] + (extra + local_ms) + entry_add[:, None]
                    )
                    np.minimum(
                        updated[target, 1:, 1, :],
                        new_node[:max_nodes],
                        out=updated[target, 1:, 1, :],
                    )
                    np.minimum(
                        updated[target, max_nodes, 1, :],
                        new_node[max_nodes],
                        out=updated[target, max_nodes, 1, :],
                    )
            values = updated

        lowest_nodes = max(1, self.min_nodes)
        best_value = np.inf
        best_state: tuple[int, int] | None = None
        for nodes_used in range(lowest_nodes, max_nodes + 1):
            for current in (0, 1):
                value = float(values[3, nodes_used, current, n_layers])
                if value < best_value - 1e-12:
                    best_value = value
                    best_state = (nodes_used, current)
        if best_state is None or not math.isfinite(best_value):
            return None
        assignment = self._backtrack(
            candidates, history, merged_from, values, best_state, entry_adds, local_ms
        )
        self._check_deadline()
        stages = self._arrange(assignment, candidates, node_ids, uniform)
        cost = cost_model.predict_ms_per_token(stages)
        lower_bound = best_value if local_ms <= min_entry else -math.inf
        return stages, cost, min(lower_bound, cost)

    @staticmethod
    def _roles(candidate: _Candidate) -> list[tuple[int, int, int, float]]:
        return [
            (_ROLE_MIDDLE, 0, candidate.cap_middle, 0.0),
            (_ROLE_FIRST, 1, candidate.cap_first, candidate.first_extra_ms),
            (_ROLE_LAST, 2, candidate.cap_last, candidate.last_extra_ms),
        ]

    @staticmethod
    def _entry_add(entry: float, min_entry: float, local_ms: float, max_nodes: int) -> FloatArray:
        """Extra hop cost for using a new node when ``nodes used`` so far is the index:
        the first node costs nothing extra; the second pays its own entry and (as a lower
        bound, exact when links are uniform) the cheapest entry back into the first."""
        add = np.full(max_nodes + 1, entry - local_ms)
        add[0] = 0.0
        add[1] = (entry - local_ms) + (min_entry - local_ms)
        return add

    def _backtrack(
        self,
        candidates: Sequence[_Candidate],
        history: Sequence[FloatArray],
        merged_from: Mapping[int, FloatArray],
        final_values: FloatArray,
        best_state: tuple[int, int],
        entry_adds: Sequence[FloatArray],
        local_ms: float,
    ) -> list[tuple[int, int, int]]:
        """(candidate index, role, layers) for every used device, from the stored tables."""
        roles_taken = 3
        nodes_used, current = best_state
        layers = final_values.shape[-1] - 1
        value = float(final_values[roles_taken, nodes_used, current, layers])
        chosen: list[tuple[int, int, int]] = []
        for index in range(len(candidates) - 1, -1, -1):
            candidate = candidates[index]
            before = history[index]
            tolerance = 1e-9 * max(1.0, abs(value))
            if abs(float(before[roles_taken, nodes_used, current, layers]) - value) <= tolerance:
                value = float(before[roles_taken, nodes_used, current, layers])
            else:
                found = False
                entry_add = entry_adds[candidate.node_index]
                max_nodes = len(entry_add) - 1
                for role, bit, cap, extra in self._roles(candidate):
                    if bit and not roles_taken & bit:
                        continue
                    source_roles = roles_taken & ~bit
                    sources: list[tuple[int, int, float]] = []
                    if current == 1:
                        sources.append((nodes_used, 1, 0.0))
                        for source_nodes in range(max_nodes + 1):
                            if min(max_nodes, source_nodes + 1) == nodes_used:
                                sources.append((source_nodes, 0, float(entry_add[source_nodes])))
                    for source_nodes, source_current, add in sources:
                        for count in range(1, min(cap, layers) + 1):
                            previous = float(
                                before[source_roles, source_nodes, source_current, layers - count]
                            )
                            candidate_value = (
                                previous + count * candidate.layer_ms + extra + local_ms + add
                            )
                            if abs(candidate_value - value) <= tolerance:
                                chosen.append((index, role, count))
                                roles_taken, nodes_used, current = (
                                    source_roles,
                                    source_nodes,
                                    source_current,
                                )
                                layers -= count
                                value = previous
                                found = True
                                break
                        if found:
                            break
                    if found:
                        break
                if not found:
                    raise AssertionError("placement programme could not be traced back")
            if index in merged_from and current == 0:
                unmerged = merged_from[index]
                tolerance = 1e-9 * max(1.0, abs(value))
                if abs(float(unmerged[roles_taken, nodes_used, 0, layers]) - value) > tolerance:
                    current = 1
            elif index in merged_from:
                raise AssertionError("placement programme state is inconsistent at a node boundary")
        if layers != 0 or roles_taken != 0:
            raise AssertionError("placement programme did not place every layer")
        chosen.reverse()
        return chosen

    def _arrange(
        self,
        assignment: Sequence[tuple[int, int, int]],
        candidates: Sequence[_Candidate],
        node_ids: Sequence[NodeId],
        uniform: bool,
    ) -> list[StagePlan]:
        """Ranks: the first-role device, the rest of its node, the other nodes (in the
        cheapest ring order), then the last node's devices with the last-role device last."""
        by_node: dict[int, list[tuple[_Candidate, int, int]]] = {}
        first: tuple[_Candidate, int] | None = None
        last: tuple[_Candidate, int] | None = None
        for index, role, count in assignment:
            candidate = candidates[index]
            by_node.setdefault(candidate.node_index, []).append((candidate, role, count))
            if role == _ROLE_FIRST:
                first = (candidate, count)
            elif role == _ROLE_LAST:
                last = (candidate, count)
        if first is None or last is None:
            raise AssertionError("placement programme lost the first or last stage")
        first_node = first[0].node_index
        last_node = last[0].node_index
        middle_nodes = [node for node in sorted(by_node) if node not in (first_node, last_node)]
        if not uniform and middle_nodes:
            middle_nodes = self._ring_order(first_node, last_node, middle_nodes, node_ids)

        def middles(node: int) -> list[StagePlan]:
            return [
                StagePlan(device=candidate.device, n_layers=count)
                for candidate, role, count in by_node[node]
                if role == _ROLE_MIDDLE
            ]

        stages = [StagePlan(device=first[0].device, n_layers=first[1]), *middles(first_node)]
        for node in middle_nodes:
            stages.extend(middles(node))
        if last_node != first_node:
            stages.extend(middles(last_node))
        stages.append(StagePlan(device=last[0].device, n_layers=last[1]))
        return stages

    def _ring_order(
        self, first_node: int, last_node: int, middle: Sequence[int], node_ids: Sequence[NodeId]
    ) -> list[int]:
        """Order of the intermediate nodes minimising first → … → last link costs (the
        closing link last → first is fixed). Exact (Held–Karp) up to 8 nodes, else
        nearest neighbour."""
        cost_model = self.cost_model

        def cost(source: int, destination: int) -> float:
            return cost_model.link_ms(node_ids[source], node_ids[destination])

        if len(middle) > 8:
            order: list[int] = []
            remaining = list(middle)
            position = first_node
            while remaining:
                self._check_deadline()
                position = min(remaining, key=lambda node: (cost(position, node), node))
                remaining.remove(position)
                order.append(position)
            return order
        count = len(middle)
        full = (1 << count) - 1
        table: dict[tuple[int, int], tuple[float, int]] = {}
        for index, node in enumerate(middle):
            table[(1 << index, index)] = (cost(first_node, node), -1)
        for mask in range(1, full + 1):
            for end in range(count):
                if not mask & (1 << end) or (mask, end) not in table:
                    continue
                base = table[(mask, end)][0]
                for following in range(count):
                    if mask & (1 << following):
                        continue
                    key = (mask | (1 << following), following)
                    value = base + cost(middle[end], middle[following])
                    if key not in table or value < table[key][0] - 1e-15:
                        table[key] = (value, end)
        best_end = min(
            range(count),
            key=lambda end: (table[(full, end)][0] + cost(middle[end], last_node), end),
        )
        order_indices: list[int] = []
        mask, end = full, best_end
        while end != -1:
            order_indices.append(end)
            previous = table[(mask, end)][1]
            mask ^= 1 << end
            end = previous
        order_indices.reverse()
        return [middle[index] for index in order_indices]


def balance_equal_stages(stages: Sequence[StagePlan], cost_model: CostModel) -> list[StagePlan]:
    """Among stages whose devices have the same effective bandwidth, spread their layers as
    evenly as memory allows. The predicted time per token is unchanged (each of those layers
    costs the same wherever it goes), but no stage is left holding one layer while an equal
    device holds the rest, which evens memory use and the pipeline's throughput."""
    counts = [stage.n_layers for stage in stages]
    groups: dict[float, list[int]] = {}
    for position, stage in enumerate(stages):
        bandwidth = round(cost_model.effective_bandwidth_gbps(stage.device), 6)
        groups.setdefault(bandwidth, []).append(position)
    last = len(stages) - 1
    for positions in groups.values():
        if len(positions) < 2:
            continue
        total = sum(counts[position] for position in positions)
        caps = {
            position: cost_model.max_layers(
                stages[position].device, position == 0, position == last
            )
            for position in positions
        }
        share = dict.fromkeys(positions, 1)
        remaining = total - len(positions)
        while remaining > 0:
            open_positions = [p for p in positions if share[p] < caps[p]]
            if not open_positions:
                return list(stages)
            target = min(open_positions, key=lambda p: (share[p], p))
            share[target] += 1
            remaining -= 1
        for position in positions:
            counts[position] = share[position]
    balanced = [
        StagePlan(device=stage.device, n_layers=count)
        for stage, count in zip(stages, counts, strict=True)
    ]
    if cost_model.violations(balanced):
        return list(stages)
    return balanced


def _node_count(devices: Sequence[PlacementDevice]) -> int:
    return len({device.node_id for device in devices})
