"""Placement: which devices run which layers of a model, and why.

Pure functions over the cluster ``State``. The decision tree follows the seed card:

* no GPU telemetry, or the devices are alike → the greedy memory-proportional split
  (strategy ``"greedy"``);
* the devices differ → ``ConstraintSatisfactionPlacement`` (strategy ``"csp"``), with the
  greedy split as its fallback when the time budget runs out (``"greedy_fallback"``).

Either way the decision records both predictions (same cost model), the solve time, the
reasons and the device scores. See docs/placement.md.
"""

import math
import statistics
import time
import uuid
from collections.abc import Mapping, Sequence

from loguru import logger
from pydantic import BaseModel, ConfigDict, Field

from exo.master.cost_model import (
    CostModel,
    CostModelConfig,
    LinkCost,
    PlacementDevice,
    StagePlan,
    device_condition,
    effective_bandwidth_gbps,
    link_ms,
    usable_bytes,
)
from exo.master.placement_csp import ConstraintSatisfactionPlacement, SolveResult
from exo.shared.types.commands import PlaceInstance
from exo.shared.types.execution import CPU_COMPUTE_DEVICE_ID, backend_of_device
from exo.shared.types.gpu import (
    CPU_MEMORY_BANDWIDTH_GBPS,
    CPU_PEAK_TFLOPS_FP16,
    DeviceGPUState,
    GPUDeviceInfo,
    GPULink,
)
from exo.shared.types.ids import DeviceId, InstanceId, NodeId, RunnerId
from exo.shared.types.instances import (
    GPUDeviceScore,
    Instance,
    PlacementDecision,
    PlacementObjective,
    PlacementStrategy,
    Shard,
)
from exo.shared.types.memory import format_bytes
from exo.shared.types.models import ModelCard
from exo.shared.types.node import NodeInfo
from exo.shared.types.state import State

__all__ = [
    "ModelDoesNotFitError",
    "NoCandidateDevicesError",
    "NotEnoughNodesError",
    "PlacementError",
    "_compute_device_scores",
    "_has_heterogeneous_gpus",
    "candidate_devices",
    "find_candidates",
    "get_shard_assignments",
    "heterogeneity_reasons",
    "place_instance",
    "score_devices",
]

DEFAULT_BANDWIDTH_GBPS: dict[str, float] = {
    "cuda": 300.0,
    "metal": 100.0,
    "simulated": 100.0,
    "cpu": CPU_MEMORY_BANDWIDTH_GBPS,
}
"""Used when a device has not reported its static facts (or reports 0); unknown → CPU's."""
DEFAULT_TFLOPS_FP16: dict[str, float] = {
    "cuda": 30.0,
    "metal": 10.0,
    "simulated": 10.0,
    "cpu": CPU_PEAK_TFLOPS_FP16,
}
CPU_BANDWIDTH_GBPS = DEFAULT_BANDWIDTH_GBPS["cpu"]  # same assumption as the CPU backend
CPU_TFLOPS_FP16 = DEFAULT_TFLOPS_FP16["cpu"]

HETEROGENEITY_TOLERANCE = 0.10
"""Memory totals or bandwidths further apart than this (max/min − 1) make a cluster uneven."""


# --- errors ------------------------------------------------------------------------------
class PlacementError(Exception):
    """A placement that cannot be made; ``status_code`` and ``detail`` are for the API."""

    status_code: int = 409

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def detail(self) -> dict[str, object]:
        return {"error": self.message}


class ModelDoesNotFitError(PlacementError):
    def __init__(self, model_id: str, needed_bytes: int, available_bytes: int, message: str):
        super().__init__(message)
        self.model_id = model_id
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes

    @property
    def detail(self) -> dict[str, object]:
        return {
            "error": self.message,
            "model_id": self.model_id,
            "needed_bytes": self.needed_bytes,
            "available_bytes": self.available_bytes,
        }


class NotEnoughNodesError(PlacementError):
    def __init__(self, required_nodes: int, available_nodes: int, message: str):
        super().__init__(message)
        self.required_nodes = required_nodes
        self.available_nodes = available_nodes

    @property
    def detail(self) -> dict[str, object]:
        return {
            "error": self.message,
            "required_nodes": self.required_nodes,
            "available_nodes": self.available_nodes,
        }


class NoCandidateDevicesError(PlacementError):
    status_code = 503


# --- candidate devices ---------------------------------------------------------------------
def _backend_of(device_id: str, info: GPUDeviceInfo | None) -> str:
    if info is not None:
        return info.backend
    prefix = device_id.split(":", 1)[0].lower()
    return prefix if prefix in DEFAULT_BANDWIDTH_GBPS else "unknown"


def _gpu_device(state: DeviceGPUState, info: GPUDeviceInfo | None) -> PlacementDevice:
    backend = _backend_of(state.device_id, info)
    bandwidth = info.memory_bandwidth_gbps if info is not None else 0.0
    tflops = info.peak_tflops_fp16 if info is not None else 0.0
    total = state.memory_total_bytes or (info.memory_total_bytes if info is not None else 0)
    return PlacementDevice(
        node_id=state.node_id,
        device_id=state.device_id,
        name=info.name if info is not None else state.device_id,
        vendor=info.vendor if info is not None else "unknown",
        backend=backend,
        memory_total_bytes=total,
        memory_free_bytes=max(0, total - state.memory_used_bytes),
        memory_bandwidth_gbps=bandwidth or DEFAULT_BANDWIDTH_GBPS.get(backend, CPU_BANDWIDTH_GBPS),
        peak_tflops_fp16=tflops or DEFAULT_TFLOPS_FP16.get(backend, CPU_TFLOPS_FP16),
        utilization_percent=(
            state.compute_utilization_percent
            if state.utilization_median_percent is None
            else state.utilization_median_percent
        ),
        temperature_c=state.thermal_temperature_c,
        throttle_threshold_c=state.thermal_throttle_threshold_c,
        is_thermal_throttling=state.is_thermal_throttling,
        battery_percent=state.battery_percent,
        is_plugged_in=state.is_plugged_in,
        has_static_info=info is not None,
        max_working_set_bytes=info.max_working_set_bytes if info is not None else None,
        peer_links=dict(info.peer_links) if info is not None else {},
    )


def _cpu_device(node: NodeInfo) -> PlacementDevice:
    return PlacementDevice(
        node_id=NodeId(node.node_id),
        device_id=CPU_COMPUTE_DEVICE_ID,
        name=f"CPU ({node.friendly_name})",
        vendor="cpu",
        backend="cpu",
        memory_total_bytes=node.ram_total_bytes or node.ram_available_bytes,
        memory_free_bytes=node.ram_available_bytes,
        memory_bandwidth_gbps=CPU_BANDWIDTH_GBPS,
        peak_tflops_fp16=CPU_TFLOPS_FP16,
        is_cpu_fallback=True,
    )


def _devices_from_gpu_state(
    gpu_device_state: Mapping[NodeId, Mapping[DeviceId, DeviceGPUState]],
    gpu_device_info: Mapping[NodeId, Mapping[DeviceId, GPUDeviceInfo]] | None,
    node_ids: Sequence[NodeId] | None = None,
) -> list[PlacementDevice]:
    infos = gpu_device_info or {}
    wanted = set(node_ids) if node_ids is not None else None
    devices: list[PlacementDevice] = []
    for node_id in sorted(gpu_device_state):
        if wanted is not None and node_id not in wanted:
            continue
        per_node = gpu_device_state[node_id]
        for device_id in sorted(per_node):
            info = infos.get(node_id, {}).get(device_id)
            devices.append(_gpu_device(per_node[device_id], info))
    return devices


class Candidates(BaseModel):
    """The devices placement may use, and why any other device of the cluster is left out."""

    model_config = ConfigDict(frozen=True)

    devices: list[PlacementDevice]
    left_out: list[str] = Field(default_factory=list)


def _unexecutable_reason(device_id: str, node: NodeInfo) -> str | None:
    """Why the node's MLX cannot compute on ``device_id``, or None when it can (or the node
    did not say)."""
    capability = node.execution
    if capability is None or capability.can_run_on(device_id):
        return None
    where = f"{device_id} on {node.friendly_name}"
    if capability.mlx_version is None:
        return f"{where}: MLX does not load on this node ({capability.error})"
    match backend_of_device(device_id):
        case "cuda":
            if "cuda" not in capability.backends:
                return f"{where}: MLX on this node has no CUDA — start it with --extra cuda13"
        case "metal":
            return f"{where}: MLX on this node has no Metal GPU"
        case _:
            pass
    return f"{where}: MLX on this node cannot compute on it ({capability.error or 'not found'})"


def find_candidates(state: State) -> Candidates:
    """Every device placement may use, and the devices left out (telemetry only).

    A node offers each GPU in its telemetry (joined with the GPU's static info) on which
    its MLX can compute; a node that offers none (no GPU, or GPUs its MLX cannot reach)
    offers its CPU and RAM instead, as long as MLX loads there. A simulated GPU is offered as
    its file describes it (its runner computes on the node's CPU); a node that did not
    report what its MLX can do is taken at its telemetry's word."""
    devices: list[PlacementDevice] = []
    left_out: list[str] = []
    for node_id in sorted(state.nodes):
        node = state.nodes[node_id]
        per_node = state.gpu_device_state.get(NodeId(node_id), {})
        infos = state.gpu_device_info.get(NodeId(node_id), {})
        usable: dict[DeviceId, DeviceGPUState] = {}
        for device_id, reading in per_node.items():
            info = infos.get(device_id)
            simulated = reading.is_simulated or (info is not None and info.is_simulated)
            reason = None if simulated else _unexecutable_reason(device_id, node)
            if reason is None:
                usable[device_id] = reading
            else:
                left_out.append(reason)
        if usable:
            devices.extend(
                _devices_from_gpu_state({NodeId(node_id): usable}, state.gpu_device_info)
            )
        else:
            cpu_reason = _unexecutable_reason(CPU_COMPUTE_DEVICE_ID, node)
            if cpu_reason is None:
                devices.append(_cpu_device(node))
            elif not per_node:
                left_out.append(cpu_reason)
    priors = _calibration_priors(devices, state)
    return Candidates(
        devices=[_with_cluster_knowledge(device, state, priors) for device in devices],
        left_out=left_out,
    )


def _measured_factor(device: PlacementDevice, state: State) -> float | None:
    calibration = state.device_calibration.get(device.node_id, {}).get(device.device_id)
    return calibration.factor if calibration is not None and calibration.factor > 0 else None


def _calibration_priors(devices: Sequence[PlacementDevice], state: State) -> dict[str, float]:
    """Per backend, the median calibration of its measured devices: what a device of that
    backend that has not run yet is assumed to be. Without it, a new device would be judged
    by its datasheet against measured ones, and look faster than it is (the same software
    stack misses its datasheet by much the same factor on every device of a backend)."""
    factors: dict[str, list[float]] = {}
    for device in devices:
        factor = _measured_factor(device, state)
        if factor is not None:
            factors.setdefault(device.backend, []).append(factor)
    return {backend: statistics.median(values) for backend, values in factors.items()}


def _with_cluster_knowledge(
    device: PlacementDevice, state: State, priors: Mapping[str, float]
) -> PlacementDevice:
    """What the cluster knows about ``device`` beyond its reading: a CPU's cores (from its
    node), its calibration from measured stage times (or its backend's prior when it has
    not been measured), and that its load is ours when it runs one of our shards (our
    runners' work is not foreign load; they share the device only while both serve)."""
    update: dict[str, object] = {}
    node = state.nodes.get(device.node_id)
    if device.backend == "cpu" and node is not None and node.cpu_count > 0:
        update["cpu_cores"] = node.cpu_count
    factor = _measured_factor(device, state)
    if factor is None:
        factor = priors.get(device.backend)
    if factor is not None:
        update["calibration_factor"] = factor
    runs_ours = any(
        shard.node_id == device.node_id and shard.device_id == device.device_id
        for instance in state.instances.values()
        for shard in instance.shards
    )
    if runs_ours:
        update["utilization_percent"] = 0.0
    return device.model_copy(update=update) if update else device


def candidate_devices(state: State) -> list[PlacementDevice]:
    """The devices :func:`find_candidates` offers."""
    return find_candidates(state).devices


def links_from_state(
    gpu_links: Mapping[NodeId, Mapping[NodeId, GPULink]],
) -> dict[NodeId, dict[NodeId, LinkCost]]:
    """Measured links as cost-model inputs (a measured 0 Mbps link is treated as unmeasured)."""
    links: dict[NodeId, dict[NodeId, LinkCost]] = {}
    for source, destinations in gpu_links.items():
        for destination, link in destinations.items():
            if link.bandwidth_mbps > 0:
                links.setdefault(source, {})[destination] = LinkCost(
                    latency_ms=link.latency_ms, bandwidth_mbps=link.bandwidth_mbps
                )
    return links


# --- heterogeneity -----------------------------------------------------------------------
def _spread(values: Sequence[float]) -> float:
    low, high = min(values), max(values)
    if high <= 0:
        return 0.0
    return float("inf") if low <= 0 else high / low - 1.0


def heterogeneity_reasons(
    devices: Sequence[PlacementDevice], config: CostModelConfig | None = None
) -> list[str]:
    """Why these devices count as unlike (empty when they are alike).

    The rule: two or more devices, and they differ in backend, vendor or model name (among
    devices whose static facts are known), or in total memory or memory bandwidth by more
    than 10 % (max/min − 1), or in measured speed (calibration) by more than 10 %, or in
    live condition as :func:`device_condition` judges it — throttling or near the
    threshold, on (low) battery, busy (others leave at most half).
    """
    if len(devices) < 2:
        return []
    reasons: list[str] = []
    backends = sorted({device.backend for device in devices})
    if len(backends) > 1:
        reasons.append(f"backends differ ({', '.join(backends)})")
    known = [device for device in devices if device.has_static_info or device.is_cpu_fallback]
    vendors = sorted({device.vendor for device in known})
    if len(vendors) > 1:
        reasons.append(f"vendors differ ({', '.join(vendors)})")
    names = sorted({device.name for device in known if not device.is_cpu_fallback})
    if len(names) > 1:
        reasons.append(f"models differ ({', '.join(names)})")
    totals = [float(device.memory_total_bytes) for device in devices]
    if _spread(totals) > HETEROGENEITY_TOLERANCE:
        reasons.append(
            f"total memory differs by more than {HETEROGENEITY_TOLERANCE:.0%} "
            f"({format_bytes(int(min(totals)))} to {format_bytes(int(max(totals)))})"
        )
    bandwidths = [device.memory_bandwidth_gbps for device in known]
    if len(bandwidths) > 1 and _spread(bandwidths) > HETEROGENEITY_TOLERANCE:
        reasons.append(
            f"memory bandwidth differs by more than {HETEROGENEITY_TOLERANCE:.0%} "
            f"({min(bandwidths):.0f} to {max(bandwidths):.0f} GB/s)"
        )
    calibrations = [device.calibration_factor for device in devices]
    if _spread(calibrations) > HETEROGENEITY_TOLERANCE:
        reasons.append(
            f"measured speed against the datasheet differs by more than "
            f"{HETEROGENEITY_TOLERANCE:.0%} (calibration {min(calibrations):.2f}× to "
            f"{max(calibrations):.2f}×)"
        )
    config = config or CostModelConfig()
    notes = [tuple(device_condition(device, config).notes) for device in devices]
    if len(set(notes)) > 1:
        odd = [
            f"{device.label} is {' and '.join(note)}"
            for device, note in zip(devices, notes, strict=True)
            if note
        ]
        reasons.append("live condition differs: " + "; ".join(odd))
    return reasons


def _has_heterogeneous_gpus(
    gpu_device_state: Mapping[NodeId, Mapping[DeviceId, DeviceGPUState]],
    gpu_device_info: Mapping[NodeId, Mapping[DeviceId, GPUDeviceInfo]] | None = None,
) -> bool:
    """True when the devices in ``gpu_device_state`` (node id → device id → state) are
    unlike by :func:`heterogeneity_reasons`' rule. Without ``gpu_device_info`` only memory
    and live condition can be compared."""
    return bool(heterogeneity_reasons(_devices_from_gpu_state(gpu_device_state, gpu_device_info)))


# --- scores --------------------------------------------------------------------------------
NETWORK_SCORE_PROBE_BYTES = 8192
"""Bytes of the typical hidden state used to rank links for the network score."""


def _clamp(value: float) -> float:
    return min(1.0, max(0.0, value))


def score_devices(
    devices: Sequence[PlacementDevice],
    shard_size_bytes: int,
    links: Mapping[NodeId, Mapping[NodeId, LinkCost]] | None = None,
    config: CostModelConfig | None = None,
) -> list[GPUDeviceScore]:
    """Each part in [0, 1], relative to the best candidate where a part is relative:

    * compute: peak fp16 TFLOPS × (1 − utilisation), over the best such value;
    * memory: usable memory (less the backend's reserve) over the shard size, capped at 1;
    * network: the cheapest mean link cost among the nodes over this node's mean link cost
      to the other candidate nodes (1 when there is a single node);
    * thermal: 0 when throttling or past the threshold, else the margin to the threshold
      over 30 °C (1 when the temperature is unknown), × battery charge when unplugged;
    * bandwidth: effective memory bandwidth over the best one.
    """
    config = config or CostModelConfig()
    if not devices:
        return []
    links = links or {}
    compute = [d.peak_tflops_fp16 * (1 - d.utilization_percent / 100.0) for d in devices]
    bandwidth = [effective_bandwidth_gbps(d, config) for d in devices]
    best_compute = max(compute)
    best_bandwidth = max(bandwidth)
    node_ids = sorted({d.node_id for d in devices})

    mean_link = _mean_link_ms(node_ids, links, config)
    best_link = min(mean_link.values()) if mean_link else 0.0

    scores: list[GPUDeviceScore] = []
    for index, d in enumerate(devices):
        usable = usable_bytes(d, config)
        memory = usable / shard_size_bytes if shard_size_bytes > 0 else float(usable > 0)
        condition = device_condition(d, config)
        if condition.hot:
            thermal = 0.0
        elif d.temperature_known:
            thermal = (d.throttle_threshold_c - d.temperature_c) / 30.0
        else:
            thermal = 1.0
        if not d.is_plugged_in:
            thermal = _clamp(thermal) * d.battery_percent / 100.0
        network = (
            best_link / mean_link[d.node_id]
            if d.node_id in mean_link and mean_link[d.node_id] > 0
            else 1.0
        )
        scores.append(
            GPUDeviceScore(
                node_id=d.node_id,
                device_id=d.device_id,
                compute_score=_clamp(compute[index] / best_compute if best_compute > 0 else 0.0),
                memory_score=_clamp(memory),
                network_score=_clamp(network),
                thermal_score=_clamp(thermal),
                bandwidth_score=_clamp(
                    bandwidth[index] / best_bandwidth if best_bandwidth > 0 else 0.0
                ),
            )
        )
    return scores


def _mean_link_ms(
    node_ids: Sequence[NodeId],
    links: Mapping[NodeId, Mapping[NodeId, LinkCost]],
    config: CostModelConfig,
) -> dict[NodeId, float]:
    """Each node's mean cost of a probe hop to and from the other nodes: every pair costs
    the default link but the measured ones, so the sum is linear in the measured links."""
    count = len(node_ids)
    if count < 2:
        return {}
    wanted = set(node_ids)
    default = link_ms(config.default_link, NETWORK_SCORE_PROBE_BYTES)
    totals = dict.fromkeys(node_ids, 2 * default * (count - 1))
    for source, destinations in links.items():
        if source not in wanted:
            continue
        for destination, link in destinations.items():
            if destination in wanted and destination != source:
                extra = link_ms(link, NETWORK_SCORE_PROBE_BYTES) - default
                totals[source] += extra
                totals[destination] += extra
    return {node: total / (2 * (count - 1)) for node, total in totals.items()}


def _compute_device_scores(
    cycle_node_ids: Sequence[NodeId],
    gpu_device_state: Mapping[NodeId, Mapping[DeviceId, DeviceGPUState]],
    shard_size_bytes: int,
    topology: Mapping[NodeId, Mapping[NodeId, GPULink]] | None,
    *,
    gpu_device_info: Mapping[NodeId, Mapping[DeviceId, GPUDeviceInfo]] | None = None,
    config: CostModelConfig | None = None,
) -> list[GPUDeviceScore]:
    """Scores (see :func:`score_devices`) of the GPUs of ``cycle_node_ids``; ``topology`` is
    ``State.gpu_links`` (source node → destination node → measured link) or None."""
    devices = _devices_from_gpu_state(gpu_device_state, gpu_device_info, cycle_node_ids)
    return score_devices(devices, shard_size_bytes, links_from_state(topology or {}), config)


# --- greedy --------------------------------------------------------------------------------
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


def _shards(stages: Sequence[StagePlan], cost_model: CostModel) -> list[Shard]:
    shards: list[Shard] = []
    start = 0
    last = len(stages) - 1
    for rank, stage in enumerate(stages):
        is_first, is_last = rank == 0, rank == last
        shards.append(
            Shard(
                runner_id=RunnerId(str(uuid.uuid4())),
                node_id=stage.device.node_id,
                device_id=stage.device.device_id,
                rank=rank,
                world_size=len(stages),
                start_layer=start,
                end_layer=start + stage.n_layers,
                predicted_stage_ms=cost_model.stage_ms(
                    stage.device, stage.n_layers, is_first, is_last
                ),
                base_stage_ms=cost_model.base_stage_ms(
                    stage.device, stage.n_layers, is_first, is_last
                ),
            )
        )
        start += stage.n_layers
    return shards


def _does_not_fit(
    cost_model: CostModel, devices: Sequence[PlacementDevice], min_nodes: int
) -> PlacementError:
    card = cost_model.model_card
    needed = cost_model.memory_needed(card.n_layers, True, True)
    available = sum(cost_model.usable_bytes(device) for device in devices)
    if min_nodes > 1 and needed <= available:
        holders = {d.node_id for d in devices if cost_model.max_layers(d, False, False) >= 1}
        if len(holders) < min_nodes:
            return NotEnoughNodesError(
                min_nodes,
                len(holders),
                f"{card.model_id} cannot span {min_nodes} nodes: only {len(holders)} node(s) "
                "have room for a layer",
            )
    detail = "" if needed > available else " (free memory is too fragmented across devices)"
    return ModelDoesNotFitError(
        card.model_id,
        needed,
        available,
        f"{card.model_id} needs {format_bytes(needed)} (weights + KV cache for "
        f"{card.context_length} tokens) but the candidate devices have {format_bytes(available)} "
        f"usable after each backend's reserve{detail}",
    )


def get_shard_assignments(
    model_card: ModelCard,
    devices: Sequence[PlacementDevice],
    *,
    min_nodes: int = 1,
    cost_model: CostModel | None = None,
) -> list[Shard]:
    """The greedy split as shards: fewest devices (largest free memory first) whose memory
    holds the model, memory-proportional contiguous layer ranges, ≥ 1 layer each.
    Raises ModelDoesNotFitError / NotEnoughNodesError."""
    cost_model = cost_model or CostModel(model_card=model_card)
    stages = greedy_stages(cost_model, devices, min_nodes)
    if stages is None:
        raise _does_not_fit(cost_model, devices, min_nodes)
    return _shards(stages, cost_model)


# --- the decision --------------------------------------------------------------------------
def _describe(stages: Sequence[StagePlan]) -> str:
    return ", ".join(
        f"{stage.device.node_id}/{stage.device.device_id}:{stage.n_layers}" for stage in stages
    )


def _unused_summary(
    devices: Sequence[PlacementDevice], stages: Sequence[StagePlan], cost_model: CostModel
) -> str | None:
    used = {stage.device.key for stage in stages}
    unused = [d for d in devices if d.key not in used]
    if not unused:
        return None
    labels = [
        d.label + (f" [{', '.join(notes)}]" if (notes := cost_model.condition(d).notes) else "")
        for d in unused
    ]
    shown = ", ".join(labels[:6]) + (f" and {len(labels) - 6} more" if len(labels) > 6 else "")
    return f"not used: {shown} (the chosen devices hold the model with a lower predicted time)"


CONDITION_EXPLANATIONS = 3
"""Used devices in a poor condition whose use is explained by solving without them."""


def _condition_reasons(
    cost_model: CostModel,
    devices: Sequence[PlacementDevice],
    stages: Sequence[StagePlan],
    objective: PlacementObjective,
    min_nodes: int,
    budget_ms: float,
) -> list[str]:
    """Why a throttling, unplugged or busy device is used: the best placement without it
    (same solver, same objective) is slower by the stated factor, or does not exist."""
    reasons: list[str] = []
    chosen = _objective_ms(cost_model, stages, objective)
    for stage in stages:
        if len(reasons) == CONDITION_EXPLANATIONS:
            break
        notes = cost_model.condition(stage.device).notes
        if not notes:
            continue
        others = [d for d in devices if d.key != stage.device.key]
        alternative = ConstraintSatisfactionPlacement(
            cost_model, others, min_nodes=min_nodes, budget_ms=budget_ms, objective=objective
        ).solve()
        label = f"{stage.device.label} used although {' and '.join(notes)}"
        if not alternative.stages:
            reasons.append(f"{label}: nothing fits without it")
        else:
            without = _objective_ms(cost_model, alternative.stages, objective)
            reasons.append(
                f"{label}: still {without / chosen:.2f}× faster than the best placement "
                f"without it ({chosen:.2f} against {without:.2f} ms/token)"
            )
    return reasons


def _objective_ms(
    cost_model: CostModel, stages: Sequence[StagePlan], objective: PlacementObjective
) -> float:
    if objective == "throughput":
        return cost_model.predict_bottleneck_ms(stages)
    return cost_model.predict_ms_per_token(stages)


def predict_instance(
    instance: Instance,
    state: State,
    model_card: ModelCard,
    config: CostModelConfig | None = None,
    objective: PlacementObjective = "latency",
) -> float | None:
    """The instance's own layout predicted with what ``state`` knows now (calibration
    included), in ``objective``'s terms (ms per generated token, or the bottleneck stage's
    ms), or None when one of its devices is gone."""
    devices = {device.key: device for device in find_candidates(state).devices}
    stages: list[StagePlan] = []
    for shard in sorted(instance.shards, key=lambda shard: shard.rank):
        device = devices.get((shard.node_id, shard.device_id))
        if device is None:
            return None
        stages.append(StagePlan(device=device, n_layers=shard.n_layers))
    cost_model = CostModel(
        model_card=model_card,
        config=config or CostModelConfig(),
        links=links_from_state(state.gpu_links),
    )
    return _objective_ms(cost_model, stages, objective)


class StageChoice(BaseModel):
    """Which stages a placement takes and how it came to them."""

    model_config = ConfigDict(frozen=True)

    stages: list[StagePlan]
    """Empty when nothing fits."""
    strategy: PlacementStrategy
    differences: list[str]
    """Why the devices count as unlike (empty: the greedy split was taken)."""
    greedy: list[StagePlan] | None
    scores: list[GPUDeviceScore]
    solver_result: SolveResult | None = None


def choose_stages(
    cost_model: CostModel,
    devices: Sequence[PlacementDevice],
    *,
    min_nodes: int = 1,
    objective: PlacementObjective = "latency",
    budget_ms: float = 100.0,
) -> StageChoice:
    """The decision on values alone: the greedy split when the devices are alike, else the
    solver (ranked by the devices' scores, the greedy split as its floor)."""
    greedy = greedy_stages(cost_model, devices, min_nodes)
    shard_size = (
        max(cost_model.memory_needed(stage.n_layers, False, False) for stage in greedy)
        if greedy is not None
        else cost_model.model_card.total_bytes // max(1, len(devices))
    )
    scores = score_devices(devices, shard_size, cost_model.links, cost_model.config)
    differences = heterogeneity_reasons(devices, cost_model.config)
    if not differences:
        return StageChoice(
            stages=greedy or [], strategy="greedy", differences=[], greedy=greedy, scores=scores
        )
    result = ConstraintSatisfactionPlacement(
        cost_model,
        devices,
        min_nodes=min_nodes,
        budget_ms=budget_ms,
        scores={(score.node_id, score.device_id): score.weighted_score for score in scores},
        fallback=greedy,
        objective=objective,
    ).solve()
    return StageChoice(
        stages=result.stages,
        strategy="greedy_fallback" if result.used_fallback else "csp",
        differences=differences,
        greedy=greedy,
        scores=scores,
        solver_result=result,
    )


def place_instance(
    command: PlaceInstance,
    state: State,
    model_card: ModelCard,
    *,
    csp_budget_ms: float = 100.0,
    instance_id: InstanceId | None = None,
    config: CostModelConfig | None = None,
    excluded: Mapping[tuple[NodeId, DeviceId], str] | None = None,
    log_level: str = "INFO",
) -> Instance:
    """Place ``model_card`` on the cluster in ``state``; the Instance carries its decision.

    ``excluded``: devices not to use, each with why (a heal leaves out the devices where
    the instance's runners just failed).

    Raises NoCandidateDevicesError (no node offers a device), NotEnoughNodesError
    (``command.min_nodes`` cannot be met) or ModelDoesNotFitError (with needed and
    available bytes). The solver's limit is an amount of work, so the same state gives the
    same placement however loaded the machine is; ``csp_budget_ms`` is only a safety cap.
    """
    started = time.perf_counter()
    config = config or CostModelConfig()
    candidates = find_candidates(state)
    if excluded:
        candidates = Candidates(
            devices=[device for device in candidates.devices if device.key not in excluded],
            left_out=[
                *candidates.left_out,
                *(f"{node}/{device} left out: {why}" for (node, device), why in excluded.items()),
            ],
        )
    devices = candidates.devices
    if not devices:
        why = f" ({'; '.join(candidates.left_out)})" if candidates.left_out else ""
        raise NoCandidateDevicesError(f"no node in the cluster offers a device to place on{why}")
    node_count = len({device.node_id for device in devices})
    min_nodes = command.min_nodes
    objective = command.objective
    if node_count < min_nodes:
        raise NotEnoughNodesError(
            min_nodes,
            node_count,
            f"{model_card.model_id} was asked to span {min_nodes} nodes but the cluster has "
            f"{node_count}",
        )
    cost_model = CostModel(
        model_card=model_card, config=config, links=links_from_state(state.gpu_links)
    )
    choice = choose_stages(
        cost_model, devices, min_nodes=min_nodes, objective=objective, budget_ms=csp_budget_ms
    )
    greedy = choice.greedy
    greedy_ms = cost_model.predict_ms_per_token(greedy) if greedy is not None else None
    scores = choice.scores
    differences = choice.differences
    reasons = [f"telemetry only: {reason}" for reason in candidates.left_out]
    if not choice.stages:
        raise _does_not_fit(cost_model, devices, min_nodes)
    stages = choice.stages
    strategy = choice.strategy
    result = choice.solver_result
    if result is None:
        reasons.append(
            "no GPU telemetry yet: greedy memory-proportional split"
            if not state.gpu_device_state
            else "devices are alike: greedy memory-proportional split"
        )
        solve_ms = (time.perf_counter() - started) * 1000.0
    else:
        reasons.append("devices differ: " + "; ".join(differences) + " → constraint solver")
        reasons.extend(result.reasons)
        solve_ms = result.solve_ms
        reasons.extend(
            _condition_reasons(cost_model, devices, stages, objective, min_nodes, csp_budget_ms)
        )
        unused = _unused_summary(devices, stages, cost_model)
        if unused is not None:
            reasons.append(unused)
    predicted = cost_model.predict_ms_per_token(stages)
    if greedy_ms is None:
        reasons.append(
            "the greedy split finds no placement here; its prediction shows the chosen one"
        )
    decision = PlacementDecision(
        strategy=strategy,
        heterogeneous=bool(differences),
        reasons=reasons,
        predicted_ms_per_token=predicted,
        greedy_ms_per_token=greedy_ms if greedy_ms is not None else predicted,
        solve_ms=solve_ms,
        device_scores=scores,
        objective=objective,
        predicted_bottleneck_ms=cost_model.predict_bottleneck_ms(stages),
        predicted_time_to_first_token_ms=cost_model.predict_time_to_first_token_ms(stages),
    )
    instance = Instance(
        instance_id=instance_id or InstanceId(str(uuid.uuid4())),
        model_id=model_card.model_id,
        shards=_shards(stages, cost_model),
        placement=decision,
        min_nodes=min_nodes,
        rebalance=command.rebalance,
    )
    logger.log(
        log_level,
        f"placed {model_card.model_id} ({strategy}, {objective}) on {len(stages)} device(s) "
        f"[{_describe(stages)}]: predicted {predicted:.2f} ms/token vs greedy "
        f"{decision.greedy_ms_per_token:.2f}, first token "
        f"{decision.predicted_time_to_first_token_ms:.0f} ms, solved in {solve_ms:.1f} ms",
    )
    return instance
