"""Builders, hypothesis strategies and a brute-force reference for the placement tests."""

import itertools
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from exo.master.cost_model import (
    BACKEND_PROFILES,
    CostModel,
    CostModelConfig,
    LinkCost,
    PlacementDevice,
    StagePlan,
)
from exo.shared.types.gpu import DeviceGPUState, GPUBackendName, GPUDeviceInfo
from exo.shared.types.ids import DeviceId, NodeId
from exo.shared.types.instances import PlacementObjective
from exo.shared.types.memory import GIB, MIB
from exo.shared.types.models import ModelCard
from exo.shared.types.node import NodeInfo

NOW = datetime(2025, 1, 1, tzinfo=UTC)

SMALL_RESERVE_BYTES = 32 * MIB
SMALL_RESERVES = CostModelConfig(
    backends={
        name: profile.model_copy(update={"memory_reserve_bytes": SMALL_RESERVE_BYTES})
        for name, profile in BACKEND_PROFILES.items()
    }
)
"""The default cost model with a 32 MiB reserve per backend: the tests' devices hold a few
hundred MB, which the real reserves (a GiB or more) would leave empty."""


def device(
    node: str,
    device_id: str = "cuda:0",
    *,
    memory_gb: float = 24.0,
    free_gb: float | None = None,
    bandwidth_gbps: float = 1000.0,
    tflops: float = 80.0,
    name: str = "GPU",
    vendor: str = "NVIDIA",
    backend: str = "cuda",
    utilization: float = 0.0,
    temperature_c: float = 50.0,
    throttle_threshold_c: float = 90.0,
    throttling: bool = False,
    battery_percent: float = 100.0,
    plugged_in: bool = True,
) -> PlacementDevice:
    return PlacementDevice(
        node_id=NodeId(node),
        device_id=DeviceId(device_id),
        name=name,
        vendor=vendor,
        backend=backend,
        memory_total_bytes=int(memory_gb * GIB),
        memory_free_bytes=int((memory_gb if free_gb is None else free_gb) * GIB),
        memory_bandwidth_gbps=bandwidth_gbps,
        peak_tflops_fp16=tflops,
        utilization_percent=utilization,
        temperature_c=temperature_c,
        throttle_threshold_c=throttle_threshold_c,
        is_thermal_throttling=throttling,
        battery_percent=battery_percent,
        is_plugged_in=plugged_in,
    )


def small_model(n_layers: int, layer_mb: float = 100.0, non_layer_mb: float = 50.0) -> ModelCard:
    return ModelCard(
        model_id=f"test-{n_layers}",
        n_layers=n_layers,
        layer_bytes=int(layer_mb * 1024 * 1024),
        non_layer_bytes=int(non_layer_mb * 1024 * 1024),
        hidden_size=2048,
        kv_cache_bytes_per_token=1024 * n_layers,
        context_length=1024,
    )


def node_info(node: str, *, ram_total_gb: float = 16.0, ram_available_gb: float = 12.0) -> NodeInfo:
    return NodeInfo(
        node_id=node,
        friendly_name=node,
        hostname=node,
        ram_total_bytes=int(ram_total_gb * GIB),
        ram_available_bytes=int(ram_available_gb * GIB),
        last_seen=NOW,
    )


def gpu_state(
    node: str,
    device_id: str = "cuda:0",
    *,
    memory_gb: float = 24.0,
    used_gb: float = 0.0,
    utilization: float = 0.0,
    temperature_c: float = 50.0,
    throttle_threshold_c: float = 90.0,
    throttling: bool = False,
    battery_percent: float = 100.0,
    plugged_in: bool = True,
) -> DeviceGPUState:
    return DeviceGPUState(
        device_id=DeviceId(device_id),
        node_id=NodeId(node),
        memory_used_bytes=int(used_gb * GIB),
        memory_total_bytes=int(memory_gb * GIB),
        compute_utilization_percent=utilization,
        thermal_temperature_c=temperature_c,
        thermal_throttle_threshold_c=throttle_threshold_c,
        is_thermal_throttling=throttling,
        battery_percent=battery_percent,
        is_plugged_in=plugged_in,
        last_update=NOW,
    )


def gpu_info(
    node: str,
    device_id: str = "cuda:0",
    *,
    name: str = "NVIDIA RTX 4090",
    vendor: str = "NVIDIA",
    backend: GPUBackendName = "cuda",
    memory_gb: float = 24.0,
    bandwidth_gbps: float = 1008.0,
    tflops: float = 165.0,
) -> GPUDeviceInfo:
    return GPUDeviceInfo(
        device_id=DeviceId(device_id),
        node_id=NodeId(node),
        name=name,
        vendor=vendor,
        backend=backend,
        memory_total_bytes=int(memory_gb * GIB),
        memory_bandwidth_gbps=bandwidth_gbps,
        peak_tflops_fp16=tflops,
    )


def _compositions(total: int, caps: Sequence[int]) -> Iterator[list[int]]:
    if len(caps) == 1:
        if 1 <= total <= caps[0]:
            yield [total]
        return
    for first in range(1, min(caps[0], total - len(caps) + 1) + 1):
        for rest in _compositions(total - first, caps[1:]):
            yield [first, *rest]


def brute_force(
    cost_model: CostModel,
    devices: Sequence[PlacementDevice],
    min_nodes: int = 1,
    objective: PlacementObjective = "latency",
) -> tuple[float, list[StagePlan]] | None:
    """The optimum over every ordered subset and every contiguous split: the least
    ``predict_ms_per_token`` (latency) or ``predict_bottleneck_ms`` (throughput)."""
    predict = (
        cost_model.predict_bottleneck_ms
        if objective == "throughput"
        else cost_model.predict_ms_per_token
    )
    n_layers = cost_model.model_card.n_layers
    best: tuple[float, list[StagePlan]] | None = None
    for size in range(1, min(len(devices), n_layers) + 1):
        for ordered in itertools.permutations(devices, size):
            if len({d.node_id for d in ordered}) < min_nodes:
                continue
            caps = [
                cost_model.max_layers(d, index == 0, index == size - 1)
                for index, d in enumerate(ordered)
            ]
            for counts in _compositions(n_layers, caps):
                stages = [
                    StagePlan(device=d, n_layers=c) for d, c in zip(ordered, counts, strict=True)
                ]
                cost = predict(stages)
                if best is None or cost < best[0]:
                    best = (cost, stages)
    return best


class SlowClock:
    """A clock on a machine ``factor`` times slower: every interval it measures is
    ``factor`` times longer. Patched over ``placement_csp._clock``."""

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.origin = time.perf_counter()

    def __call__(self) -> float:
        return self.origin + (time.perf_counter() - self.origin) * self.factor


# --- hypothesis strategies shared by the solver's property tests --------------------------
NODES = ["n0", "n1", "n2"]


@st.composite
def devices_strategy(
    draw: st.DrawFn, min_devices: int = 1, max_devices: int = 5, roomy: bool = False
) -> list[PlacementDevice]:
    count = draw(st.integers(min_devices, max_devices))
    sizes = [0.25, 0.5, 1.0, 2.0] if roomy else [0.15, 0.25, 0.5, 1.0]
    devices: list[PlacementDevice] = []
    for index in range(count):
        memory_gb = draw(st.sampled_from(sizes))
        devices.append(
            device(
                draw(st.sampled_from(NODES)),
                f"cuda:{index}",
                memory_gb=memory_gb,
                free_gb=memory_gb * draw(st.sampled_from([0.5, 1.0])),
                bandwidth_gbps=draw(st.sampled_from([40.0, 100.0, 400.0, 1000.0])),
                utilization=draw(st.sampled_from([0.0, 0.0, 60.0])),
                temperature_c=draw(st.sampled_from([50.0, 87.0, 95.0])),
                throttling=draw(st.booleans()) and draw(st.booleans()),
                battery_percent=draw(st.sampled_from([10.0, 100.0])),
                plugged_in=draw(st.booleans()) or draw(st.booleans()),
            )
        )
    return devices


@st.composite
def cost_model_strategy(
    draw: st.DrawFn, links: str, min_layers: int = 2, max_layers: int = 12
) -> CostModel:
    n_layers = draw(st.integers(min_layers, max_layers))
    card = small_model(
        n_layers,
        layer_mb=draw(st.sampled_from([50.0, 100.0])),
        non_layer_mb=draw(st.sampled_from([0.0, 40.0, 400.0])),
    )
    measured: dict[NodeId, dict[NodeId, LinkCost]] = {}
    if links == "uniform" and draw(st.booleans()):
        shared = LinkCost(
            latency_ms=draw(st.sampled_from([0.1, 2.0])),
            bandwidth_mbps=draw(st.sampled_from([100.0, 10_000.0])),
        )
        measured = {NodeId(a): {NodeId(b): shared for b in NODES if b != a} for a in NODES}
    elif links == "uneven":
        for a in NODES:
            for b in NODES:
                if a != b:
                    measured.setdefault(NodeId(a), {})[NodeId(b)] = LinkCost(
                        latency_ms=draw(st.sampled_from([0.2, 1.0, 3.0])),
                        bandwidth_mbps=draw(st.sampled_from([100.0, 1000.0, 10_000.0])),
                    )
    return CostModel(model_card=card, links=measured, config=SMALL_RESERVES)


FAST = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
