"""The GPU backend abstraction and the factory that picks one for this machine.

A backend knows how to list a node's devices (static facts, ``GPUDeviceInfo``) and how to
take one live reading of a device (``DeviceGPUState``). Backends are created initialised by
``GPUBackendFactory.create_backend``; every blocking library call they make runs in a worker
thread (``anyio.to_thread.run_sync``) so the event loop never stalls on a driver.

Selection (``preference="auto"``): the ``EXO_GPU_BACKEND`` environment variable if set, else
``simulated`` when a simulation file is given, else CUDA when NVML loads and sees at least one
device, else Metal on Apple silicon with MLX's Metal backend, else CPU. A backend that fails to
initialise logs one warning and the factory falls back to CPU: GPU trouble never stops a node.
"""

import os
import platform
import sys
from pathlib import Path
from typing import Protocol, get_args, runtime_checkable

from loguru import logger

from exo.shared.types.gpu import DeviceGPUState, GPUBackendName, GPUDeviceInfo
from exo.shared.types.ids import DeviceId, NodeId

GPU_BACKEND_ENV_VAR = "EXO_GPU_BACKEND"
"""Environment variable naming the backend to use when the preference is ``auto``."""

BACKEND_PREFERENCES: tuple[str, ...] = ("auto", *get_args(GPUBackendName))


class GPUBackendError(RuntimeError):
    """A backend could not start or could not take a reading."""


class GPUBackendUnavailableError(GPUBackendError):
    """The backend's hardware or library is simply not present on this machine.

    Auto-detection treats this as "try the next backend", not as a failure worth a warning.
    """


class GPUDeviceNotFoundError(GPUBackendError):
    """``sample`` was asked for a device id the backend does not have."""


@runtime_checkable
class GPUBackend(Protocol):
    """What the telemetry collector (and anything else) needs from a GPU backend.

    ``node_id`` is passed to each call rather than fixed at construction, so one backend
    object serves whichever node id its owner runs as; it only stamps the returned models.
    """

    @property
    def name(self) -> GPUBackendName: ...

    async def initialize(self) -> None:
        """Load the library and find the devices. Raises ``GPUBackendError`` on failure."""
        ...

    async def shutdown(self) -> None:
        """Release the library. Idempotent."""
        ...

    async def list_devices(self, node_id: NodeId) -> list[GPUDeviceInfo]:
        """Static facts for every device, in device order."""
        ...

    async def sample(self, node_id: NodeId, device_id: DeviceId) -> DeviceGPUState:
        """One live reading of one device. Raises ``GPUDeviceNotFoundError`` for unknown ids."""
        ...


def is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


class GPUBackendFactory:
    """Creates an initialised backend; see the module docstring for the selection order."""

    @staticmethod
    async def create_backend(
        preference: str = "auto", simulate_gpus_file: Path | None = None
    ) -> GPUBackend:
        """Return an initialised backend; never raises for GPU trouble (falls back to CPU).

        ``preference`` is ``auto``, ``cuda``, ``metal``, ``cpu`` or ``simulated``. With
        ``auto``, ``EXO_GPU_BACKEND`` (same values) decides first. ``simulated`` needs
        ``simulate_gpus_file``; with ``auto`` a given file selects ``simulated``.
        """
        chosen = preference.strip().lower()
        if chosen not in BACKEND_PREFERENCES:
            logger.warning(
                f"Unknown GPU backend preference {preference!r} "
                f"(expected one of {', '.join(BACKEND_PREFERENCES)}); using auto-detection"
            )
            chosen = "auto"
        if chosen == "auto":
            from_env = os.environ.get(GPU_BACKEND_ENV_VAR, "").strip().lower()
            if from_env and from_env not in BACKEND_PREFERENCES:
                logger.warning(
                    f"Ignoring {GPU_BACKEND_ENV_VAR}={from_env!r} "
                    f"(expected one of {', '.join(BACKEND_PREFERENCES)}); using auto-detection"
                )
            elif from_env:
                chosen = from_env
        if chosen == "auto" and simulate_gpus_file is not None:
            chosen = "simulated"

        if chosen == "auto":
            backend = await _auto_detect()
        else:
            backend = await _create_explicit(chosen, simulate_gpus_file)
        logger.info(f"GPU backend: {backend.name}")
        return backend


async def _initialise(backend: GPUBackend) -> GPUBackend:
    await backend.initialize()
    return backend


async def _cpu_backend() -> GPUBackend:
    return await _initialise(_make_backend("cpu", None))


def _make_backend(name: str, simulate_gpus_file: Path | None) -> GPUBackend:
    match name:
        case "cuda":
            from exo.gpu.backends.cuda import CUDABackend

            return CUDABackend()
        case "metal":
            from exo.gpu.backends.metal import MetalBackend

            return MetalBackend()
        case "simulated":
            from exo.gpu.backends.simulated import SimulatedBackend

            if simulate_gpus_file is None:
                raise GPUBackendError(
                    "the simulated GPU backend needs a device file (--simulate-gpus FILE)"
                )
            return SimulatedBackend(simulate_gpus_file)
        case _:  # "cpu" (names are validated before they get here)
            from exo.gpu.backends.cpu import CPUBackend

            return CPUBackend()


async def _create_explicit(name: str, simulate_gpus_file: Path | None) -> GPUBackend:
    if name == "cpu":
        return await _cpu_backend()
    try:
        return await _initialise(_make_backend(name, simulate_gpus_file))
    except Exception as error:  # any failure of a GPU library must degrade, never crash
        logger.warning(f"GPU backend {name!r} failed to initialise ({error}); falling back to CPU")
        return await _cpu_backend()


async def _auto_detect() -> GPUBackend:
    candidates = ["cuda", "metal"] if is_apple_silicon() else ["cuda"]
    for name in candidates:
        try:
            return await _initialise(_make_backend(name, None))
        except GPUBackendUnavailableError as error:
            logger.debug(f"GPU backend {name!r} not available: {error}")
        except Exception as error:  # present but broken: say so once, keep looking
            logger.warning(
                f"GPU backend {name!r} failed to initialise ({error}); trying the next one"
            )
    return await _cpu_backend()
