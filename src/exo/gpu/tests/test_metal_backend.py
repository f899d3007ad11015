"""The Metal backend against a fake ``mlx.core`` (the library boundary)."""

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from exo.gpu.backend import GPUBackendUnavailableError, GPUDeviceNotFoundError
from exo.gpu.backends import metal
from exo.gpu.backends.metal import METAL_DEVICE_ID, MetalBackend, apple_chip_for
from exo.shared.types.ids import DeviceId, NodeId

NODE = NodeId("node-a")
MIB = 2**20


def fake_mx(
    *, available: bool, info: dict[str, Any], active_bytes: int, top_level_device_info: bool = True
) -> Any:
    metal_namespace = SimpleNamespace(is_available=lambda: available)
    mx = SimpleNamespace(metal=metal_namespace, get_active_memory=lambda: active_bytes)
    if top_level_device_info:
        mx.device_info = lambda: info
    else:  # older MLX: only mx.metal.device_info
        metal_namespace.device_info = lambda: info
    return mx


@pytest.fixture
def install_fake_mx(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    def install(**kwargs: Any) -> None:
        monkeypatch.setattr(metal, "mx", fake_mx(**kwargs))

    return install


M2_MAX_INFO = {
    "architecture": "applegpu_g14s",
    "device_name": "Apple M2 Max",
    "memory_size": 4096 * MIB,
    "max_recommended_working_set_size": 1024 * MIB,
}


@pytest.mark.anyio
async def test_unavailable_metal_is_reported_as_unavailable(
    install_fake_mx: Callable[..., None],
) -> None:
    install_fake_mx(available=False, info={}, active_bytes=0)
    with pytest.raises(GPUBackendUnavailableError):
        await MetalBackend().initialize()


@pytest.mark.anyio
@pytest.mark.parametrize("top_level_device_info", [True, False])
async def test_metal_device_facts_and_reading(
    install_fake_mx: Callable[..., None], top_level_device_info: bool
) -> None:
    install_fake_mx(
        available=True,
        info=M2_MAX_INFO,
        active_bytes=256 * MIB,
        top_level_device_info=top_level_device_info,
    )
    backend = MetalBackend()
    await backend.initialize()
    (info,) = await backend.list_devices(NODE)
    assert info.device_id == METAL_DEVICE_ID
    assert info.name == "Apple M2 Max"
    assert info.vendor == "Apple"
    assert info.backend == "metal"
    assert info.compute_capability == "applegpu_g14s"
    assert info.memory_total_bytes == 1024 * MIB  # the recommended working set
    assert info.max_working_set_bytes == 1024 * MIB
    assert info.peer_links == {}
    assert info.memory_bandwidth_gbps == 400
    assert info.peak_tflops_fp16 == pytest.approx(13.6)

    state = await backend.sample(NODE, METAL_DEVICE_ID)
    assert state.memory_total_bytes == 1024 * MIB
    # This machine has far more than 768 MiB available, so MLX's own use decides.
    assert state.memory_used_bytes == 256 * MIB
    assert state.thermal_temperature_c == -1.0
    assert state.compute_utilization_percent == 0.0
    assert state.is_thermal_throttling is False

    with pytest.raises(GPUDeviceNotFoundError):
        await backend.sample(NODE, DeviceId("metal:1"))
    await backend.shutdown()
    assert await backend.list_devices(NODE) == []


@pytest.mark.anyio
async def test_working_set_unknown_when_mlx_does_not_report_it(
    install_fake_mx: Callable[..., None],
) -> None:
    info_without_working_set = {
        key: value
        for key, value in M2_MAX_INFO.items()
        if key != "max_recommended_working_set_size"
    }
    install_fake_mx(available=True, info=info_without_working_set, active_bytes=0)
    backend = MetalBackend()
    await backend.initialize()
    (info,) = await backend.list_devices(NODE)
    assert info.max_working_set_bytes is None
    assert info.memory_total_bytes == 4096 * MIB  # the physical memory size instead


def test_chip_table_prefers_the_most_specific_name() -> None:
    assert apple_chip_for("Apple M1 Ultra").memory_bandwidth_gbps == 800
    assert apple_chip_for("Apple M1").memory_bandwidth_gbps == 68
    assert apple_chip_for("Apple M4 Pro").memory_bandwidth_gbps == 273
    assert apple_chip_for("Apple M9 Hyper").memory_bandwidth_gbps > 0
