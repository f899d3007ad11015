"""Choosing the device MLX computes on, explicitly, and failing clearly when it cannot.

A runner is given a device by placement (``cuda:1``, ``metal:0``, ``cpu:0``) and computes
there or nowhere: :func:`use_compute_device` checks that this process's MLX can reach the
device, runs a small computation on it, and only then makes it MLX's default device. It
never falls back to another device; the error says why the device is out of reach and, for
a CUDA device on a node without MLX's CUDA build, the command that fixes it.

Everything MLX is asked goes through :class:`MLXDevices` (the MLX boundary), which tests
replace with a fake. CUDA devices are numbered as NVML numbers them (PCI bus order); a
runner started with ``CUDA_VISIBLE_DEVICES`` sees only its device, so the index MLX uses is
its position in that list.
"""

import os
from collections.abc import Mapping
from importlib import metadata
from typing import TYPE_CHECKING, Literal, Protocol

from exo.shared.types.execution import ComputeDevice, backend_of_device
from exo.shared.types.ids import DeviceId

if TYPE_CHECKING:  # MLX is imported by the process that computes, not at import time
    import mlx.core as mx

DeviceKind = Literal["cpu", "gpu"]

CUDA_EXTRA_HINT = (
    "start the node with `uv run --extra cuda13 exo` (NVIDIA driver 580 or newer; "
    "`--extra cuda12` for older drivers)"
)

MLX_BUILDS = ("mlx-cuda-13", "mlx-cuda-12", "mlx-cuda", "mlx-metal", "mlx-cpu")
"""MLX's backend packages, most capable first."""


class DeviceUnavailableError(RuntimeError):
    """This process's MLX cannot compute on the device; the message says why."""


class MLXDevices(Protocol):
    """What device selection asks MLX."""

    def cuda_available(self) -> bool: ...

    def metal_available(self) -> bool: ...

    def gpu_count(self) -> int: ...

    def device_name(self, kind: DeviceKind, index: int) -> str: ...

    def compute_on(self, kind: DeviceKind, index: int) -> None:
        """Evaluate a small array on the device; raises when that fails."""
        ...

    def make_default(self, kind: DeviceKind, index: int) -> None: ...


class RealMLX:
    """:class:`MLXDevices` over ``mlx.core``."""

    def __init__(self) -> None:
        import mlx.core as mx

        self._mx = mx

    def _device(self, kind: DeviceKind, index: int) -> "mx.Device":
        mx = self._mx
        return mx.Device(mx.gpu if kind == "gpu" else mx.cpu, index)

    def cuda_available(self) -> bool:
        return bool(self._mx.cuda.is_available())

    def metal_available(self) -> bool:
        return bool(self._mx.metal.is_available())

    def gpu_count(self) -> int:
        mx = self._mx
        return int(mx.device_count(mx.gpu)) if mx.is_available(mx.gpu) else 0

    def device_name(self, kind: DeviceKind, index: int) -> str:
        return str(self._mx.device_info(self._device(kind, index)).get("device_name", ""))

    def compute_on(self, kind: DeviceKind, index: int) -> None:
        mx = self._mx
        with mx.stream(self._device(kind, index)):
            result = (mx.arange(8, dtype=mx.float32) * 2).sum()
            mx.eval(result)
        if result.item() != 56:
            raise DeviceUnavailableError(f"a test computation on {kind}:{index} gave {result}")

    def make_default(self, kind: DeviceKind, index: int) -> None:
        self._mx.set_default_device(self._device(kind, index))


def installed_mlx_build() -> str | None:
    """The MLX backend package installed here (``mlx-cuda-13``, ``mlx-cpu``, ...), or None.
    The empty ``mlx-cpu`` stand-in that a CUDA extra installs (version ``+none``) does not
    count."""
    for name in MLX_BUILDS:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if not version.endswith("+none"):
            return name
    return None


def mlx_gpu_index(cuda_index: int, environ: Mapping[str, str]) -> int:
    """MLX's index of NVIDIA GPU ``cuda_index`` (NVML's number) in this process."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return cuda_index
    entries = [entry.strip() for entry in visible.split(",")]
    if str(cuda_index) not in entries:
        raise DeviceUnavailableError(
            f"cuda:{cuda_index} is not among this process's visible GPUs "
            f"(CUDA_VISIBLE_DEVICES={visible})"
        )
    return entries.index(str(cuda_index))


def _resolve(
    device_id: str, mlx: MLXDevices, environ: Mapping[str, str]
) -> tuple[DeviceKind, int, ComputeDevice]:
    backend = backend_of_device(device_id)
    _, _, number = device_id.partition(":")
    if not number.isdigit():
        raise DeviceUnavailableError(f"'{device_id}' is not a device name like cuda:0 or cpu:0")
    index = int(number)
    if backend == "cpu":
        return (
            "cpu",
            0,
            ComputeDevice(
                device_id=DeviceId(device_id), backend="cpu", name=mlx.device_name("cpu", 0)
            ),
        )
    if backend == "cuda":
        if not mlx.cuda_available():
            build = installed_mlx_build() or "no MLX backend package"
            raise DeviceUnavailableError(
                f"{device_id} is out of reach: MLX on this node has no CUDA ({build} is "
                f"installed); {CUDA_EXTRA_HINT}"
            )
        mlx_index = mlx_gpu_index(index, environ)
        count = mlx.gpu_count()
        if mlx_index >= count:
            raise DeviceUnavailableError(
                f"{device_id} is out of reach: MLX sees {count} CUDA device(s) here"
            )
        return (
            "gpu",
            mlx_index,
            ComputeDevice(
                device_id=DeviceId(device_id),
                backend="cuda",
                name=mlx.device_name("gpu", mlx_index),
            ),
        )
    if backend == "metal":
        if not mlx.metal_available() or index != 0:
            raise DeviceUnavailableError(
                f"{device_id} is out of reach: MLX on this node has no Metal GPU "
                "(Apple silicon with macOS only)"
            )
        return (
            "gpu",
            0,
            ComputeDevice(
                device_id=DeviceId(device_id), backend="metal", name=mlx.device_name("gpu", 0)
            ),
        )
    raise DeviceUnavailableError(f"'{device_id}' is not a device MLX computes on")


def best_compute_device(mlx: MLXDevices, environ: Mapping[str, str]) -> str:
    """The device a runner told no device uses: the first GPU MLX reaches, else the CPU."""
    if mlx.cuda_available() and mlx.gpu_count() > 0:
        visible = environ.get("CUDA_VISIBLE_DEVICES", "").strip()
        first = visible.split(",")[0].strip() if visible else "0"
        return f"cuda:{first}"
    if mlx.metal_available():
        return "metal:0"
    return "cpu:0"


def _checked(
    device_id: str, mlx: MLXDevices, environ: Mapping[str, str]
) -> tuple[DeviceKind, int, ComputeDevice]:
    kind, index, device = _resolve(device_id, mlx, environ)
    try:
        mlx.compute_on(kind, index)
    except DeviceUnavailableError:
        raise
    except Exception as error:  # the backend raises its own types (a CUDA error, say)
        raise DeviceUnavailableError(f"{device_id} failed a test computation: {error}") from error
    return kind, index, device


def check_compute_device(
    device_id: str, mlx: MLXDevices, environ: Mapping[str, str] | None = None
) -> ComputeDevice:
    """The device, after a test computation on it; raises :class:`DeviceUnavailableError`."""
    return _checked(device_id, mlx, os.environ if environ is None else environ)[2]


def use_compute_device(
    device_id: str | None, mlx: MLXDevices | None = None, environ: Mapping[str, str] | None = None
) -> ComputeDevice:
    """Make ``device_id`` (None: :func:`best_compute_device`) this process's MLX default
    device, or raise :class:`DeviceUnavailableError`; returns what MLX computes on."""
    backend = mlx if mlx is not None else RealMLX()
    environment = os.environ if environ is None else environ
    chosen = device_id if device_id is not None else best_compute_device(backend, environment)
    kind, index, device = _checked(chosen, backend, environment)
    backend.make_default(kind, index)
    return device
