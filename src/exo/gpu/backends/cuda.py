"""NVIDIA backend: NVML through ``pynvml`` (the ``nvidia-ml-py`` package).

NVML is initialised once in ``initialize`` and the device handles are kept until
``shutdown``; a reading never re-initialises. Every NVML call runs in a worker thread.

A query that the device, driver or library does not support (``NVMLError`` with
NOT_SUPPORTED, FUNCTION_NOT_FOUND, NO_PERMISSION, INVALID_ARGUMENT or NOT_FOUND, or a function
missing from an older ``pynvml``) is treated as "unknown": the field is None / [] / its
documented default. Any other NVML error (GPU lost, unknown error) raises. A query the device
or driver lacks (NOT_SUPPORTED, FUNCTION_NOT_FOUND, missing from ``pynvml``) is not asked again
until the next ``initialize``, so a reading makes no call that is bound to fail.

Static facts, per device:

- memory bandwidth (GB/s) = max memory clock (MHz) x 1e6 x 2 (double data rate)
  x bus width (bits) / 8 / 1e9. NVML reports GDDR clocks as half the data rate too, so the
  factor 2 holds for HBM and GDDR alike. H100 SXM: 2619 MHz x 2 x 5120 / 8 = 3352 GB/s
  (datasheet 3.35 TB/s); H200: 3201 MHz x 2 x 6144 / 8 = 4917 GB/s (datasheet 4.8 TB/s);
  A100 40 GB: 1215 MHz x 2 x 5120 / 8 = 1555 GB/s (datasheet 1555 GB/s).
- peak fp16 TFLOPS = SM count x max SM clock x dense fp16 tensor FLOPs per SM per clock
  (``FP16_FLOPS_PER_SM_PER_CLOCK``, by compute capability). Approximate: NVML's max SM clock is
  a little above the boost clock datasheets use, so H100 SXM comes out at 132 x 1980 MHz x 4096
  = 1070 TFLOPS against the datasheet's 989.
- SM count: ``nvmlDeviceGetAttributes().multiprocessorCount`` where available, else CUDA
  cores (``nvmlDeviceGetNumGpuCores``) / cores per SM for the architecture, else the
  published count for a known device name (``SM_COUNT_BY_NAME``).
  Unknown SM count or clocks give 0 (unknown) TFLOPS; unknown bus width gives 0 GB/s.

Peer links (``GPUDeviceInfo.peer_links``), read once at ``initialize`` for every ordered pair
of devices NVML lists, with ``nvmlDeviceGetP2PStatus(a, b, caps index)``: ``nvlink`` when the
NVLINK capability is OK, else ``pcie_p2p`` when the READ capability is OK, else ``pcie_host``.
A pair for which either query raises any ``NVMLError`` (or the function is missing) is left out.

Device ids are ``cuda:<NVML index>``.
"""

from collections.abc import Callable
from typing import Any

import anyio.to_thread
import pynvml
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field

from exo.gpu.backend import GPUBackendError, GPUBackendUnavailableError, GPUDeviceNotFoundError
from exo.gpu.backends.host import DEFAULT_THROTTLE_THRESHOLD_C, read_battery, utc_now
from exo.shared.types.gpu import (
    UNKNOWN_TEMPERATURE_C,
    DeviceGPUState,
    GPUBackendName,
    GPUDeviceInfo,
    PeerLinkKind,
)
from exo.shared.types.ids import DeviceId, NodeId

UNSUPPORTED_ERROR_CODES = frozenset(
    {
        pynvml.NVML_ERROR_INVALID_ARGUMENT,
        pynvml.NVML_ERROR_NOT_SUPPORTED,
        pynvml.NVML_ERROR_NO_PERMISSION,
        pynvml.NVML_ERROR_NOT_FOUND,
        pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
    }
)
"""NVML errors that mean "this query has no answer here", not "something broke"."""

_FOR_GOOD_ERROR_CODES = frozenset(
    {pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND}
)
"""Unsupported answers that asking again cannot change (the device or driver lacks the query)."""

_MEMORY_V2_FALLBACK_CODES = UNSUPPORTED_ERROR_CODES | {pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH}
"""Errors from the v2 memory query after which we use the v1 query instead."""

_ABSENT_LIBRARY_ERROR_CODES = frozenset(
    {pynvml.NVML_ERROR_DRIVER_NOT_LOADED, pynvml.NVML_ERROR_LIBRARY_NOT_FOUND}
)

# NVML's constants, read from the real module at import: the tests swap ``pynvml`` for a fake
# afterwards, and these values are the stable C ABI of nvml.h anyway.
_NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
_NVML_TEMPERATURE_THRESHOLD_SHUTDOWN = pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN
_NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
_NVML_TEMPERATURE_THRESHOLD_GPU_MAX = pynvml.NVML_TEMPERATURE_THRESHOLD_GPU_MAX
_NVML_CLOCK_SM = pynvml.NVML_CLOCK_SM
_NVML_CLOCK_MEM = pynvml.NVML_CLOCK_MEM
_NVML_MEMORY_V2_VERSION = pynvml.nvmlMemory_v2


def _plain_int(constant: int | tuple[int]) -> int:
    """An NVML constant as an int: nvidia-ml-py defines ``NVML_P2P_CAPS_INDEX_READ = 0,`` (a
    stray comma makes it the tuple ``(0,)``, which ctypes refuses as an argument)."""
    return constant[0] if isinstance(constant, tuple) else constant


_NVML_P2P_CAPS_INDEX_NVLINK = _plain_int(pynvml.NVML_P2P_CAPS_INDEX_NVLINK)
_NVML_P2P_CAPS_INDEX_READ = _plain_int(pynvml.NVML_P2P_CAPS_INDEX_READ)
_NVML_P2P_STATUS_OK = _plain_int(pynvml.NVML_P2P_STATUS_OK)

CLOCK_EVENT_REASONS: tuple[tuple[int, str], ...] = (
    (pynvml.nvmlClocksEventReasonGpuIdle, "gpu_idle"),
    (pynvml.nvmlClocksEventReasonApplicationsClocksSetting, "applications_clocks_setting"),
    (pynvml.nvmlClocksEventReasonSwPowerCap, "sw_power_cap"),
    (pynvml.nvmlClocksEventReasonHwSlowdown, "hw_slowdown"),
    (pynvml.nvmlClocksEventReasonSyncBoost, "sync_boost"),
    (pynvml.nvmlClocksEventReasonSwThermalSlowdown, "sw_thermal_slowdown"),
    (pynvml.nvmlClocksEventReasonHwThermalSlowdown, "hw_thermal_slowdown"),
    (pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown, "hw_power_brake_slowdown"),
    (pynvml.nvmlClocksEventReasonDisplayClockSetting, "display_clock_setting"),
)
"""NVML clock-event (formerly "clocks throttle") reason bits and the names we report."""

THERMAL_REASONS = frozenset({"sw_thermal_slowdown", "hw_thermal_slowdown"})

FP16_FLOPS_PER_SM_PER_CLOCK: dict[tuple[int, int], int] = {
    (6, 0): 256,  # P100: no tensor cores, fp16 at twice the fp32 rate (64 cores x 2 x 2)
    (6, 1): 4,  # consumer Pascal: fp16 at 1/64 of fp32
    (6, 2): 256,
    (7, 0): 1024,  # V100: 8 tensor cores x 64 FMA x 2
    (7, 2): 1024,
    (7, 5): 1024,  # Turing (T4: 40 SMs x 1590 MHz -> 65 TFLOPS)
    (8, 0): 2048,  # A100 (108 SMs x 1410 MHz -> 312 TFLOPS)
    (8, 6): 1024,  # GA10x (A40, RTX 30xx; fp16 accumulate)
    (8, 7): 1024,  # Orin
    (8, 9): 1024,  # Ada (L40S: 142 SMs x 2520 MHz -> 366 TFLOPS)
    (9, 0): 4096,  # Hopper (H100 SXM: 132 SMs x 1830 MHz -> 989 TFLOPS)
    (10, 0): 8192,  # Blackwell datacenter (B200)
    (10, 3): 8192,
    (12, 0): 1024,  # Blackwell consumer (RTX 50xx)
    (12, 1): 1024,
}
"""Dense fp16 tensor-core FLOPs per SM per clock, by compute capability (approximate)."""

_FP16_FLOPS_BY_MAJOR = {5: 256, 6: 256, 7: 1024, 8: 1024, 9: 4096, 10: 8192, 12: 1024}

CUDA_CORES_PER_SM: dict[tuple[int, int], int] = {
    (6, 0): 64,
    (7, 0): 64,
    (7, 2): 64,
    (7, 5): 64,
    (8, 0): 64,
}
"""FP32 cores per SM where it is not 128 (used only to derive SM count from core count)."""


SM_COUNT_BY_NAME: tuple[tuple[str, int], ...] = (
    ("H100 PCIe", 114),
    ("H100", 132),
    ("H200", 132),
    ("H800", 132),
    ("GH200", 132),
    ("B200", 148),
    ("A100", 108),
    ("A800", 108),
    ("A30", 56),
    ("A40", 84),
    ("A10", 72),
    ("L40", 142),
    ("L4", 58),
    ("V100", 80),
    ("T4", 40),
)
"""Last resort for the SM count when NVML answers neither the attribute nor the core count
query: published SM counts, first name contained in the device name wins."""


def sm_count_from_name(device_name: str) -> int | None:
    for fragment, count in SM_COUNT_BY_NAME:
        if fragment in device_name:
            return count
    return None


def fp16_flops_per_sm_per_clock(major: int, minor: int) -> int:
    known = FP16_FLOPS_PER_SM_PER_CLOCK.get((major, minor))
    if known is not None:
        return known
    return _FP16_FLOPS_BY_MAJOR.get(major, 4096 if major > 12 else 256)


def memory_bandwidth_gbps(bus_width_bits: int, max_memory_clock_mhz: float) -> float:
    """Peak bandwidth from bus width and max memory clock (double data rate)."""
    return max_memory_clock_mhz * 1e6 * 2 * (bus_width_bits / 8) / 1e9


def peak_tflops_fp16(sm_count: int, max_sm_clock_mhz: float, major: int, minor: int) -> float:
    per_clock = fp16_flops_per_sm_per_clock(major, minor)
    return sm_count * max_sm_clock_mhz * 1e6 * per_clock / 1e12


def decode_clock_event_reasons(mask: int) -> list[str]:
    return [name for bit, name in CLOCK_EVENT_REASONS if mask & bit]


class _CUDADevice(BaseModel):
    """What we keep per device between readings (handle plus static facts)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    index: int
    handle: Any
    name: str
    compute_capability: tuple[int, int] | None
    sm_count: int | None
    memory_total_bytes: int
    memory_bandwidth_gbps: float
    peak_tflops_fp16: float
    sm_clock_max_mhz: float | None
    slowdown_threshold_c: float | None
    shutdown_threshold_c: float | None
    peer_links: dict[DeviceId, PeerLinkKind] = Field(default_factory=dict)

    @property
    def device_id(self) -> DeviceId:
        return DeviceId(f"cuda:{self.index}")


def _is_nvml_error(error: BaseException) -> bool:
    nvml_error_class = getattr(pynvml, "NVMLError", None)
    return isinstance(nvml_error_class, type) and isinstance(error, nvml_error_class)


def _error_code(error: BaseException) -> int | None:
    value = getattr(error, "value", None)
    return value if isinstance(value, int) else None


class _Unanswered(Exception):
    """An NVML query that has no answer here; ``for_good`` when asking again cannot help."""

    def __init__(self, for_good: bool) -> None:
        super().__init__()
        self.for_good = for_good


def _call(function_name: str, *args: Any) -> Any:
    """Call ``pynvml.<function_name>``; ``_Unanswered`` when the query is unsupported here."""
    function: Callable[..., Any] | None = getattr(pynvml, function_name, None)
    if function is None:  # an older pynvml
        raise _Unanswered(for_good=True)
    try:
        return function(*args)
    except Exception as error:
        code = _error_code(error) if _is_nvml_error(error) else None
        if code in UNSUPPORTED_ERROR_CODES:
            raise _Unanswered(for_good=code in _FOR_GOOD_ERROR_CODES) from error
        raise


def _optional(function_name: str, *args: Any) -> Any:
    """Call ``pynvml.<function_name>``; None when the query is unsupported here."""
    try:
        return _call(function_name, *args)
    except _Unanswered:
        return None


def _as_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def _p2p_ok(source: _CUDADevice, target: _CUDADevice, caps_index: int) -> bool:
    status = _call("nvmlDeviceGetP2PStatus", source.handle, target.handle, caps_index)
    return int(status) == _NVML_P2P_STATUS_OK


def _peer_link(source: _CUDADevice, target: _CUDADevice) -> PeerLinkKind | None:
    """How ``source`` reaches ``target``; None when NVML cannot say (any NVML error)."""
    try:
        if _p2p_ok(source, target, _NVML_P2P_CAPS_INDEX_NVLINK):
            return "nvlink"
        if _p2p_ok(source, target, _NVML_P2P_CAPS_INDEX_READ):
            return "pcie_p2p"
    except _Unanswered:
        return None
    except Exception as error:
        if not _is_nvml_error(error):
            raise
        logger.debug(f"NVML P2P status {source.device_id} -> {target.device_id}: {error}")
        return None
    return "pcie_host"


def _read_peer_links(
    source: _CUDADevice, devices: list[_CUDADevice]
) -> dict[DeviceId, PeerLinkKind]:
    links: dict[DeviceId, PeerLinkKind] = {}
    for target in devices:
        if target.index == source.index:
            continue
        kind = _peer_link(source, target)
        if kind is not None:
            links[target.device_id] = kind
    return links


_QueryKey = tuple[DeviceId, str, tuple[int, ...]]
"""(device, NVML function, arguments after the handle): one query of one device."""


class CUDABackend:
    """NVIDIA GPUs via NVML."""

    def __init__(self) -> None:
        self._devices: dict[DeviceId, _CUDADevice] = {}
        self._unanswerable: set[_QueryKey] = set()
        self._initialised = False

    @property
    def name(self) -> GPUBackendName:
        return "cuda"

    async def initialize(self) -> None:
        if self._initialised:
            return
        devices = await anyio.to_thread.run_sync(self._initialise_blocking)
        self._devices = {device.device_id: device for device in devices}
        self._unanswerable = set()
        self._initialised = True

    async def shutdown(self) -> None:
        if not self._initialised:
            return
        self._initialised = False
        self._devices = {}
        await anyio.to_thread.run_sync(self._shutdown_blocking)

    async def list_devices(self, node_id: NodeId) -> list[GPUDeviceInfo]:
        return [
            GPUDeviceInfo(
                device_id=device.device_id,
                node_id=node_id,
                name=device.name,
                vendor="NVIDIA",
                backend="cuda",
                memory_total_bytes=device.memory_total_bytes,
                memory_bandwidth_gbps=device.memory_bandwidth_gbps,
                peak_tflops_fp16=device.peak_tflops_fp16,
                compute_capability=(
                    f"{device.compute_capability[0]}.{device.compute_capability[1]}"
                    if device.compute_capability
                    else None
                ),
                sm_count=device.sm_count,
                peer_links=device.peer_links,
            )
            for device in self._devices.values()
        ]

    async def sample(self, node_id: NodeId, device_id: DeviceId) -> DeviceGPUState:
        device = self._devices.get(device_id)
        if device is None:
            raise GPUDeviceNotFoundError(
                f"no CUDA device {device_id} (have: {', '.join(self._devices) or 'none'})"
            )
        return await anyio.to_thread.run_sync(lambda: self._read_state(node_id, device))

    # --- blocking parts, run in a worker thread ---

    def _initialise_blocking(self) -> list[_CUDADevice]:
        try:
            pynvml.nvmlInit()
        except Exception as error:
            if _is_nvml_error(error) and _error_code(error) in _ABSENT_LIBRARY_ERROR_CODES:
                raise GPUBackendUnavailableError(f"NVML is not available: {error}") from error
            raise GPUBackendError(f"NVML failed to initialise: {error}") from error
        try:
            count = int(pynvml.nvmlDeviceGetCount())
            if count < 1:
                raise GPUBackendUnavailableError("NVML sees no NVIDIA GPU")
            devices = [self._read_static(index) for index in range(count)]
            return [
                device.model_copy(update={"peer_links": _read_peer_links(device, devices)})
                for device in devices
            ]
        except BaseException:
            self._shutdown_blocking()
            raise

    def _shutdown_blocking(self) -> None:
        try:
            pynvml.nvmlShutdown()
        except Exception as error:
            if not _is_nvml_error(error):
                raise

    def _read_static(self, index: int) -> _CUDADevice:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = _as_text(_optional("nvmlDeviceGetName", handle) or f"NVIDIA GPU {index}")
        capability_raw = _optional("nvmlDeviceGetCudaComputeCapability", handle)
        capability = (int(capability_raw[0]), int(capability_raw[1])) if capability_raw else None
        sm_count = self._read_sm_count(handle, capability) or sm_count_from_name(name)
        memory = _optional("nvmlDeviceGetMemoryInfo", handle)
        memory_total = int(memory.total) if memory is not None else 0
        bus_width = _optional("nvmlDeviceGetMemoryBusWidth", handle)
        max_memory_clock = _optional("nvmlDeviceGetMaxClockInfo", handle, _NVML_CLOCK_MEM)
        max_sm_clock = _optional("nvmlDeviceGetMaxClockInfo", handle, _NVML_CLOCK_SM)
        bandwidth = (
            memory_bandwidth_gbps(int(bus_width), float(max_memory_clock))
            if bus_width and max_memory_clock
            else 0.0
        )
        tflops = (
            peak_tflops_fp16(sm_count, float(max_sm_clock), *capability)
            if sm_count and max_sm_clock and capability
            else 0.0
        )
        slowdown = _optional(
            "nvmlDeviceGetTemperatureThreshold", handle, _NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
        )
        if slowdown is None or slowdown <= 0:
            slowdown = _optional(
                "nvmlDeviceGetTemperatureThreshold", handle, _NVML_TEMPERATURE_THRESHOLD_GPU_MAX
            )
        shutdown = _optional(
            "nvmlDeviceGetTemperatureThreshold", handle, _NVML_TEMPERATURE_THRESHOLD_SHUTDOWN
        )
        return _CUDADevice(
            index=index,
            handle=handle,
            name=name,
            compute_capability=capability,
            sm_count=sm_count,
            memory_total_bytes=memory_total,
            memory_bandwidth_gbps=bandwidth,
            peak_tflops_fp16=tflops,
            sm_clock_max_mhz=float(max_sm_clock) if max_sm_clock else None,
            slowdown_threshold_c=float(slowdown) if slowdown and slowdown > 0 else None,
            shutdown_threshold_c=float(shutdown) if shutdown and shutdown > 0 else None,
        )

    def _read_sm_count(self, handle: Any, capability: tuple[int, int] | None) -> int | None:
        attributes = _optional("nvmlDeviceGetAttributes", handle)
        count = getattr(attributes, "multiprocessorCount", None) if attributes else None
        if isinstance(count, int) and count > 0:
            return count
        cores = _optional("nvmlDeviceGetNumGpuCores", handle)
        if cores and capability:
            return max(1, int(cores) // CUDA_CORES_PER_SM.get(capability, 128))
        return None

    def _query(self, device: _CUDADevice, function_name: str, *args: int) -> Any:
        """``_optional`` for a reading; a query the device or driver lacks is not asked again,
        so a reading makes no NVML call that is bound to fail."""
        key: _QueryKey = (device.device_id, function_name, args)
        if key in self._unanswerable:
            return None
        try:
            return _call(function_name, device.handle, *args)
        except _Unanswered as unanswered:
            if unanswered.for_good:
                self._unanswerable.add(key)
            return None

    def _read_memory(self, device: _CUDADevice) -> tuple[int, int] | None:
        """(used, total) bytes. Prefers the v2 query, whose ``used`` leaves out memory the
        driver reserves; falls back to v1 for good once v2 turns out unsupported."""
        v2_key: _QueryKey = (
            device.device_id,
            "nvmlDeviceGetMemoryInfo",
            (_NVML_MEMORY_V2_VERSION,),
        )
        if v2_key not in self._unanswerable:
            try:
                memory = pynvml.nvmlDeviceGetMemoryInfo(device.handle, _NVML_MEMORY_V2_VERSION)
                return int(memory.used), int(memory.total)
            except TypeError:  # an older pynvml without the version argument
                pass
            except Exception as error:
                code = _error_code(error)
                if not _is_nvml_error(error) or code not in _MEMORY_V2_FALLBACK_CODES:
                    raise
            self._unanswerable.add(v2_key)
        memory = self._query(device, "nvmlDeviceGetMemoryInfo")
        if memory is None:
            return None
        return int(memory.used), int(memory.total)

    def _read_state(self, node_id: NodeId, device: _CUDADevice) -> DeviceGPUState:
        memory = self._read_memory(device)
        used, total = memory if memory is not None else (0, device.memory_total_bytes)
        utilisation = self._query(device, "nvmlDeviceGetUtilizationRates")
        temperature = self._query(device, "nvmlDeviceGetTemperature", _NVML_TEMPERATURE_GPU)
        power_draw = self._query(device, "nvmlDeviceGetPowerUsage")
        power_limit = self._query(device, "nvmlDeviceGetEnforcedPowerLimit")
        if power_limit is None:
            power_limit = self._query(device, "nvmlDeviceGetPowerManagementLimit")
        sm_clock = self._query(device, "nvmlDeviceGetClockInfo", _NVML_CLOCK_SM)
        reasons_mask = self._query(device, "nvmlDeviceGetCurrentClocksEventReasons")
        if reasons_mask is None:  # a driver older than the "clocks event" name
            reasons_mask = self._query(device, "nvmlDeviceGetCurrentClocksThrottleReasons")
        reasons = decode_clock_event_reasons(int(reasons_mask)) if reasons_mask is not None else []
        temperature_c = float(temperature) if temperature is not None else UNKNOWN_TEMPERATURE_C
        threshold_c = device.slowdown_threshold_c
        if reasons_mask is not None:
            throttling = any(reason in THERMAL_REASONS for reason in reasons)
        else:  # no reasons reported: fall back to comparing with the slowdown threshold
            throttling = threshold_c is not None and temperature_c >= threshold_c
        battery = read_battery()
        return DeviceGPUState(
            device_id=device.device_id,
            node_id=node_id,
            memory_used_bytes=min(used, total) if total else used,
            memory_total_bytes=total,
            compute_utilization_percent=(
                min(100.0, max(0.0, float(utilisation.gpu))) if utilisation is not None else 0.0
            ),
            thermal_temperature_c=temperature_c,
            thermal_throttle_threshold_c=(
                threshold_c if threshold_c is not None else DEFAULT_THROTTLE_THRESHOLD_C
            ),
            thermal_shutdown_threshold_c=device.shutdown_threshold_c,
            is_thermal_throttling=throttling,
            battery_percent=battery.percent,
            is_plugged_in=battery.is_plugged_in,
            last_update=utc_now(),
            power_draw_watts=float(power_draw) / 1000 if power_draw is not None else None,
            power_limit_watts=float(power_limit) / 1000 if power_limit is not None else None,
            sm_clock_mhz=float(sm_clock) if sm_clock is not None else None,
            sm_clock_max_mhz=device.sm_clock_max_mhz,
            throttle_reasons=reasons,
        )
