"""What MLX on this node can compute on, found once at start in a short-lived child process.

The child (``python -m exo.worker.execution_probe``) imports MLX, runs a test computation on
the CPU and on every GPU its build can reach, and prints an :class:`ExecutionCapability`.
A child, because MLX's CUDA build fails to load where the NVIDIA driver is missing, and
initialising a GPU costs memory that the node process should not hold; the node process
itself never needs MLX. The worker reports the answer with the node's static info, and
warns once when the node's telemetry sees NVIDIA GPUs that its MLX cannot use.
"""

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata

from loguru import logger

from exo.shared.types.execution import CPU_COMPUTE_DEVICE_ID, ExecutionCapability
from exo.shared.types.gpu import GPUDeviceInfo
from exo.worker.compute_device import (
    CUDA_EXTRA_HINT,
    DeviceUnavailableError,
    MLXDevices,
    check_compute_device,
    installed_mlx_build,
)

PROBE_TIMEOUT_S = 180.0
"""A first CUDA initialisation can take a while (kernels load, the driver starts)."""

PROBE_ENVIRONMENT = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
"""CUDA numbers GPUs as NVML does (by PCI bus), so ``cuda:N`` means the same GPU to both."""


def visible_cuda_ids(count: int, environ: Mapping[str, str]) -> list[int]:
    """NVML's numbers of the ``count`` GPUs MLX sees, given ``CUDA_VISIBLE_DEVICES``."""
    visible = environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if not visible:
        return list(range(count))
    entries = [entry.strip() for entry in visible.split(",")]
    return [int(entry) for entry in entries[:count] if entry.isdigit()]


def probe_devices(
    mlx: MLXDevices, mlx_version: str, mlx_build: str | None, environ: Mapping[str, str]
) -> ExecutionCapability:
    """Every device MLX computes a test array on, and why any other is out of reach."""
    candidates = [str(CPU_COMPUTE_DEVICE_ID)]
    if mlx.cuda_available():
        candidates += [f"cuda:{n}" for n in visible_cuda_ids(mlx.gpu_count(), environ)]
    if mlx.metal_available():
        candidates.append("metal:0")
    devices = []
    problems: list[str] = []
    for device_id in candidates:
        try:
            devices.append(check_compute_device(device_id, mlx, environ))
        except DeviceUnavailableError as error:
            problems.append(str(error))
    return ExecutionCapability(
        mlx_version=mlx_version,
        mlx_build=mlx_build,
        devices=devices,
        error="; ".join(problems) or None,
    )


def _probe_here() -> ExecutionCapability:
    try:
        from exo.worker.compute_device import RealMLX

        mlx = RealMLX()  # imports mlx.core: where a broken install fails
        return probe_devices(mlx, metadata.version("mlx"), installed_mlx_build(), os.environ)
    except Exception as error:  # a broken MLX install raises anything from ImportError on
        return ExecutionCapability(
            mlx_build=installed_mlx_build(), error=f"MLX does not load here: {error}"
        )


def probe_execution(timeout_s: float = PROBE_TIMEOUT_S) -> ExecutionCapability:
    """Run the probe in a child process (blocking; call it from a worker thread)."""
    try:
        result = subprocess.run(
            [sys.executable, "-m", "exo.worker.execution_probe"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, **PROBE_ENVIRONMENT},
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return ExecutionCapability(error=f"the MLX probe did not finish: {error}")
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        tail = result.stderr.strip()[-400:]
        return ExecutionCapability(error=f"the MLX probe failed (exit {result.returncode}): {tail}")
    return ExecutionCapability.model_validate_json(lines[-1])


def unusable_gpu_warning(
    telemetry_devices: Sequence[GPUDeviceInfo], capability: ExecutionCapability
) -> str | None:
    """One sentence when the node's telemetry sees real NVIDIA GPUs that MLX cannot use."""
    unusable = [
        device.device_id
        for device in telemetry_devices
        if device.backend == "cuda"
        and not device.is_simulated
        and not capability.can_run_on(device.device_id)
    ]
    if not unusable:
        return None
    build = capability.mlx_build or "no MLX backend package"
    return (
        f"NVML sees {len(unusable)} NVIDIA GPU(s) ({', '.join(unusable)}) but MLX on this node "
        f"cannot compute on them ({build} installed): they report telemetry only and models "
        f"run on the CPU here; {CUDA_EXTRA_HINT}"
    )


def log_execution(capability: ExecutionCapability) -> None:
    where = ", ".join(
        f"{d.device_id} ({d.name})" if d.name else d.device_id for d in capability.devices
    )
    if capability.mlx_version is None:
        logger.error(f"this node cannot run models: {capability.error}")
        return
    logger.info(f"MLX {capability.mlx_version} ({capability.mlx_build}) computes on {where}")
    if capability.error:
        logger.info(f"out of MLX's reach here: {capability.error}")


def main() -> int:
    print(json.dumps(_probe_here().model_dump(mode="json")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
