"""Telemetry collection -> event -> state -> placement, with the real pieces in one process:
simulated devices read by the simulated backend, GPUTelemetryCollector emitting events,
apply() building the State, place_instance() deciding."""

import json
from pathlib import Path

import pytest

from exo.gpu.backends.simulated import SimulatedBackend
from exo.master.placement import place_instance
from exo.models.cards import get_model_card
from exo.shared.apply import apply
from exo.shared.types.commands import PlaceInstance
from exo.shared.types.events import Event, IndexedEvent, NodeInfoReported
from exo.shared.types.ids import DeviceId, NodeId
from exo.shared.types.node import NodeStaticInfo
from exo.shared.types.state import State
from exo.worker.gpu_telemetry import GPUTelemetryCollector

pytestmark = pytest.mark.anyio

GIB = 1024**3


class Cluster:
    """The global log in one process: events applied in order, as the master would index."""

    def __init__(self) -> None:
        self.state = State()

    async def emit(self, event: Event) -> None:
        self.state = apply(
            self.state, IndexedEvent(idx=self.state.last_event_applied_idx + 1, event=event)
        )


def device_file(path: Path, devices: list[dict[str, object]]) -> Path:
    path.write_text(json.dumps({"devices": devices}))
    return path


def gpu(name: str, memory_gb: int, bandwidth: float, **extra: object) -> dict[str, object]:
    return {
        "device_id": "cuda:0",
        "name": name,
        "vendor": "NVIDIA",
        "memory_total_bytes": memory_gb * GIB,
        "memory_bandwidth_gbps": bandwidth,
        "peak_tflops_fp16": bandwidth / 10,
        "thermal_temperature_c": 50,
        "thermal_throttle_threshold_c": 87,
        **extra,
    }


async def report(cluster: Cluster, node: str, devices_file: Path) -> GPUTelemetryCollector:
    info = NodeStaticInfo(
        friendly_name=node, hostname=node, os="Linux", cpu_count=8, ram_total_bytes=64 * GIB
    )
    await cluster.emit(
        NodeInfoReported(node_id=NodeId(node), info=info, ram_available_bytes=32 * GIB)
    )
    backend = SimulatedBackend(devices_file)
    await backend.initialize()
    collector = GPUTelemetryCollector(NodeId(node), backend, cluster.emit)
    await collector.collect_device_state()
    return collector


async def test_telemetry_drives_placement(tmp_path: Path) -> None:
    cluster = Cluster()
    slow = device_file(tmp_path / "slow.json", [gpu("Sim 64 GB", 64, 200, vendor="Apple")])
    fast_a = device_file(tmp_path / "a.json", [gpu("Sim 4090", 24, 1008)])
    fast_b = device_file(tmp_path / "b.json", [gpu("Sim 4090", 24, 1008)])
    await report(cluster, "slow", slow)
    collector_a = await report(cluster, "fast-a", fast_a)
    await report(cluster, "fast-b", fast_b)
    assert {node: len(devices) for node, devices in cluster.state.gpu_device_state.items()} == {
        "slow": 1,
        "fast-a": 1,
        "fast-b": 1,
    }
    card = get_model_card("Llama-3.1-70B-Instruct-4bit")
    assert card is not None

    instance = place_instance(PlaceInstance(model_id=card.model_id), cluster.state, card)
    assert instance.placement.strategy == "csp"
    assert instance.placement.predicted_ms_per_token < instance.placement.greedy_ms_per_token
    assert {shard.node_id for shard in instance.shards} == {"fast-a", "fast-b"}

    # One fast GPU starts throttling: the next reading reaches the state, and placement
    # weighs it: at half speed it is still faster than the 200 GB/s device, so it stays,
    # the decision says why, and the prediction grows.
    device_file(
        fast_a, [gpu("Sim 4090", 24, 1008, is_thermal_throttling=True, thermal_temperature_c=92)]
    )
    await collector_a.collect_device_state()
    assert cluster.state.gpu_device_state[NodeId("fast-a")][
        DeviceId("cuda:0")
    ].is_thermal_throttling
    replaced = place_instance(PlaceInstance(model_id=card.model_id), cluster.state, card)
    assert "fast-a" in {shard.node_id for shard in replaced.shards}
    assert any("used although throttling: still" in reason for reason in replaced.placement.reasons)
    assert replaced.placement.predicted_ms_per_token > instance.placement.predicted_ms_per_token
