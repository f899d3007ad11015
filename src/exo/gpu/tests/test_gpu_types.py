"""The GPU models' compatibility: fields added later default, so older logs still parse."""

import json

import pytest
from pydantic import ValidationError

from exo.shared.types.gpu import DeviceGPUState, GPUDeviceInfo
from exo.shared.types.ids import DeviceId

OLD_DEVICE_INFO = {
    "device_id": "cuda:0",
    "node_id": "node-a",
    "name": "NVIDIA H100",
    "vendor": "NVIDIA",
    "backend": "cuda",
    "memory_total_bytes": 80 * 2**30,
    "memory_bandwidth_gbps": 3352.0,
    "peak_tflops_fp16": 1070.0,
    "compute_capability": "9.0",
    "sm_count": 132,
    "is_simulated": False,
}

OLD_DEVICE_STATE = {
    "device_id": "cuda:0",
    "node_id": "node-a",
    "memory_used_bytes": 2**30,
    "memory_total_bytes": 80 * 2**30,
    "compute_utilization_percent": 37.0,
    "last_update": "2025-01-01T00:00:00Z",
}


def test_device_info_from_before_working_set_and_peer_links_parses() -> None:
    info = GPUDeviceInfo.model_validate_json(json.dumps(OLD_DEVICE_INFO))
    assert info.max_working_set_bytes is None
    assert info.peer_links == {}


def test_device_info_round_trips_working_set_and_peer_links() -> None:
    info = GPUDeviceInfo.model_validate(
        {
            **OLD_DEVICE_INFO,
            "max_working_set_bytes": 48 * 2**30,
            "peer_links": {"cuda:1": "nvlink", "cuda:2": "pcie_p2p", "cuda:3": "pcie_host"},
        }
    )
    assert GPUDeviceInfo.model_validate_json(info.model_dump_json()) == info
    assert info.peer_links[DeviceId("cuda:2")] == "pcie_p2p"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"peer_links": {"cuda:0": "nvlink"}}, "cuda:0: peer_links names the device itself"),
        ({"peer_links": {"cuda:1": "ethernet"}}, "nvlink"),
        ({"max_working_set_bytes": -1}, "max_working_set_bytes"),
    ],
)
def test_device_info_rejects_nonsense(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        GPUDeviceInfo.model_validate({**OLD_DEVICE_INFO, **changes})


def test_device_state_from_before_the_median_parses() -> None:
    state = DeviceGPUState.model_validate_json(json.dumps(OLD_DEVICE_STATE))
    assert state.utilization_median_percent is None
    with pytest.raises(ValidationError, match="utilization_median_percent"):
        DeviceGPUState.model_validate({**OLD_DEVICE_STATE, "utilization_median_percent": 101})
