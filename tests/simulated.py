"""Simulated device files for cluster tests."""

import json
from pathlib import Path
from typing import Any

GB = 1024**3


def device(
    device_id: str, name: str, memory_gb: float, bandwidth_gbps: float, **extra: Any
) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "name": name,
        "vendor": "NVIDIA",
        "memory_total_bytes": int(memory_gb * GB),
        "memory_used_bytes": 0,
        "memory_bandwidth_gbps": bandwidth_gbps,
        "peak_tflops_fp16": bandwidth_gbps / 10,
        "compute_utilization_percent": 0,
        "thermal_temperature_c": 45,
        "thermal_throttle_threshold_c": 87,
        "is_thermal_throttling": False,
        "battery_percent": 100,
        "is_plugged_in": True,
        **extra,
    }


def write_devices(path: Path, devices: list[dict[str, Any]]) -> Path:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"devices": devices}))
    temporary.replace(path)
    return path
