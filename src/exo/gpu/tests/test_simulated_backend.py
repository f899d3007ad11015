import json
import os
from pathlib import Path
from typing import Any

import pytest

from exo.gpu.backend import GPUBackendError, GPUDeviceNotFoundError
from exo.gpu.backends.simulated import SimulatedBackend
from exo.shared.types.ids import DeviceId, NodeId

NODE = NodeId("node-a")
GIB = 2**30
_mtime_ns = [1_700_000_000_000_000_000]


def write_devices(path: Path, devices: list[dict[str, Any]] | str) -> None:
    """Write the file and give it a new modification time (filesystem clocks can be coarse)."""
    path.write_text(devices if isinstance(devices, str) else json.dumps({"devices": devices}))
    _mtime_ns[0] += 1_000_000_000
    os.utime(path, ns=(_mtime_ns[0], _mtime_ns[0]))


SIM_H100: dict[str, Any] = {
    "device_id": "cuda:0",
    "name": "Sim H100",
    "vendor": "NVIDIA",
    "memory_total_bytes": 80 * GIB,
    "memory_used_bytes": 10 * GIB,
    "memory_bandwidth_gbps": 3350,
    "peak_tflops_fp16": 989,
    "compute_utilization_percent": 20,
    "thermal_temperature_c": 50,
    "thermal_throttle_threshold_c": 87,
    "is_thermal_throttling": False,
    "battery_percent": 100,
    "is_plugged_in": True,
}


@pytest.mark.anyio
async def test_devices_come_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gpus.json"
    write_devices(path, [SIM_H100, {"device_id": "metal:0", "memory_total_bytes": 16 * GIB}])
    backend = SimulatedBackend(path)
    await backend.initialize()
    h100, mac = await backend.list_devices(NODE)
    assert h100.name == "Sim H100"
    assert h100.memory_bandwidth_gbps == 3350
    assert h100.backend == "simulated"
    assert h100.is_simulated and mac.is_simulated
    assert mac.memory_total_bytes == 16 * GIB
    assert mac.peak_tflops_fp16 > 0  # defaults fill the optional fields

    state = await backend.sample(NODE, DeviceId("cuda:0"))
    assert state.is_simulated
    assert state.node_id == NODE
    assert state.memory_used_bytes == 10 * GIB
    assert state.compute_utilization_percent == 20
    assert state.thermal_throttle_threshold_c == 87
    default_state = await backend.sample(NODE, DeviceId("metal:0"))
    assert default_state.memory_used_bytes == 0
    assert default_state.thermal_temperature_c == -1.0
    assert default_state.is_plugged_in is True
    with pytest.raises(GPUDeviceNotFoundError):
        await backend.sample(NODE, DeviceId("cuda:9"))


@pytest.mark.anyio
async def test_working_set_and_peer_links_come_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gpus.json"
    write_devices(
        path,
        [
            {**SIM_H100, "peer_links": {"cuda:1": "nvlink", "cuda:2": "pcie_host"}},
            {**SIM_H100, "device_id": "cuda:1", "peer_links": {"cuda:0": "nvlink"}},
            {"device_id": "cuda:2", "memory_total_bytes": 24 * GIB},
            {"device_id": "metal:0", "memory_total_bytes": 64 * GIB, "max_working_set_gb": 48.5},
        ],
    )
    backend = SimulatedBackend(path)
    await backend.initialize()
    h100_a, h100_b, plain, mac = await backend.list_devices(NODE)
    assert h100_a.peer_links == {"cuda:1": "nvlink", "cuda:2": "pcie_host"}
    assert h100_b.peer_links == {"cuda:0": "nvlink"}
    assert plain.peer_links == {} and mac.peer_links == {}
    assert mac.max_working_set_bytes == int(48.5 * GIB)
    assert h100_a.max_working_set_bytes is None


@pytest.mark.anyio
async def test_changed_file_is_re_read(tmp_path: Path) -> None:
    path = tmp_path / "gpus.json"
    write_devices(path, [SIM_H100])
    backend = SimulatedBackend(path)
    await backend.initialize()
    write_devices(
        path, [{**SIM_H100, "memory_used_bytes": 60 * GIB, "is_thermal_throttling": True}]
    )
    state = await backend.sample(NODE, DeviceId("cuda:0"))
    assert state.memory_used_bytes == 60 * GIB
    assert state.is_thermal_throttling is True

    write_devices(path, [SIM_H100, {**SIM_H100, "device_id": "cuda:1"}])
    assert [info.device_id for info in await backend.list_devices(NODE)] == ["cuda:0", "cuda:1"]


@pytest.mark.anyio
async def test_malformed_file_keeps_last_good_reading_and_logs_once(
    tmp_path: Path, logged_warnings: list[str]
) -> None:
    path = tmp_path / "gpus.json"
    write_devices(path, [SIM_H100])
    backend = SimulatedBackend(path)
    await backend.initialize()

    write_devices(path, '{"devices": [{"device_id": "cuda:0"')  # truncated JSON
    for _ in range(3):
        state = await backend.sample(NODE, DeviceId("cuda:0"))
        assert state.memory_used_bytes == 10 * GIB
    assert len(logged_warnings) == 1
    assert str(path) in logged_warnings[0]

    write_devices(path, [{**SIM_H100, "memory_used_bytes": 90 * GIB}])  # used > total
    assert (await backend.sample(NODE, DeviceId("cuda:0"))).memory_used_bytes == 10 * GIB
    assert len(logged_warnings) == 2
    assert "exceeds" in logged_warnings[1]

    path.unlink()
    assert (await backend.sample(NODE, DeviceId("cuda:0"))).memory_used_bytes == 10 * GIB
    assert (await backend.sample(NODE, DeviceId("cuda:0"))).memory_used_bytes == 10 * GIB
    assert len(logged_warnings) == 3

    write_devices(path, [{**SIM_H100, "memory_used_bytes": 30 * GIB}])
    assert (await backend.sample(NODE, DeviceId("cuda:0"))).memory_used_bytes == 30 * GIB
    assert len(logged_warnings) == 3


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("content", "expected_message"),
    [
        (None, "cannot read simulated GPU file"),
        ("not json", "invalid simulated GPU file"),
        (json.dumps({"devices": []}), "devices"),
        (json.dumps({"devices": [{"device_id": "cuda:0"}]}), "memory_total_bytes"),
        (json.dumps({"devices": [{**SIM_H100, "memroy_used_bytes": 1}]}), "memroy_used_bytes"),
        (json.dumps({"devices": [SIM_H100, SIM_H100]}), "duplicate device_id: cuda:0"),
        (
            json.dumps({"devices": [{**SIM_H100, "peer_links": {"cuda:7": "nvlink"}}]}),
            "cuda:0: peer_links names unknown device cuda:7",
        ),
        (
            json.dumps({"devices": [{**SIM_H100, "peer_links": {"cuda:0": "nvlink"}}]}),
            "cuda:0: peer_links names the device itself",
        ),
        (
            json.dumps(
                {
                    "devices": [
                        {**SIM_H100, "peer_links": {"cuda:1": "infiniband"}},
                        {**SIM_H100, "device_id": "cuda:1"},
                    ]
                }
            ),
            r"devices\.0\.peer_links\.cuda:1: Input should be 'nvlink', 'pcie_p2p' or 'pcie_host'",
        ),
        (json.dumps({"devices": [{**SIM_H100, "max_working_set_gb": 0}]}), "max_working_set_gb"),
    ],
)
async def test_bad_file_at_initialise_is_a_clear_error(
    tmp_path: Path, content: str | None, expected_message: str
) -> None:
    path = tmp_path / "gpus.json"
    if content is not None:
        write_devices(path, content)
    with pytest.raises(GPUBackendError, match=expected_message) as raised:
        await SimulatedBackend(path).initialize()
    assert str(path) in str(raised.value)
