"""GPU telemetry cost: backend start-up, one reading, the collector's CPU, events and memory.

Usage::

    uv run python bench/telemetry.py                      # auto and simulated, one process each
    uv run python bench/telemetry.py --backend simulated --duration 20

Each backend runs in a fresh process so its resident-memory figure is its own. The collector's
CPU overhead is process CPU time (all threads, so the worker threads that call the GPU
libraries count) over the measuring window, less the CPU time of an idle event loop measured
in the same run, as a share of one core.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import psutil
from loguru import logger

# The worker has these loaded anyway: they are not telemetry's memory.
from exo.shared.types.events import DeviceGPUStatesUpdated, DeviceGPUStateUpdated, Event
from exo.shared.types.ids import NodeId

NODE = NodeId("bench-node")
GIB = 2**30
MB = 1_000_000

SIMULATED_DEVICES = {
    "devices": [
        {
            "device_id": f"cuda:{index}",
            "name": "Sim H100",
            "vendor": "NVIDIA",
            "memory_total_bytes": 80 * GIB,
            "memory_used_bytes": 4 * GIB,
            "memory_bandwidth_gbps": 3350,
            "peak_tflops_fp16": 989,
            "thermal_temperature_c": 40,
            "thermal_throttle_threshold_c": 87,
        }
        for index in range(4)
    ]
}


def verdict(value: float, target: float, goal: float) -> str:
    if value <= goal:
        return "goal met"
    if value <= target:
        return "target met"
    return "MISSED"


def row(metric: str, value: str, target: str, goal: str, outcome: str) -> None:
    print(f"  {metric:<38} {value:>14}  target {target:<10} goal {goal:<10} {outcome}")


async def measure(backend_name: str, duration_s: float, interval_s: float, samples: int) -> None:
    from exo.gpu.backend import GPUBackendFactory

    process = psutil.Process()
    rss_before = process.memory_info().rss

    simulate_file: Path | None = None
    if backend_name == "simulated":
        simulate_file = Path(tempfile.mkdtemp()) / "gpus.json"
        simulate_file.write_text(json.dumps(SIMULATED_DEVICES))

    started = time.perf_counter()
    backend = await GPUBackendFactory.create_backend(backend_name, simulate_file)
    init_s = time.perf_counter() - started
    devices = await backend.list_devices(NODE)
    print(f"\nbackend {backend.name!r} (asked for {backend_name!r}), {len(devices)} device(s):")
    for info in devices:
        print(f"    {info.device_id}: {info.name}, {info.memory_total_bytes / GIB:.1f} GiB")

    wall_per_sample: list[float] = []
    cpu_per_sample: list[float] = []
    for info in devices:
        await backend.sample(NODE, info.device_id)  # warm up (thread pool, caches)
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(samples):
            await backend.sample(NODE, info.device_id)
        wall_per_sample.append((time.perf_counter() - wall_start) / samples)
        cpu_per_sample.append((time.process_time() - cpu_start) / samples)

    baseline_s = min(5.0, duration_s)
    cpu_start = time.process_time()
    await anyio.sleep(baseline_s)
    idle_cpu_rate = (time.process_time() - cpu_start) / baseline_s

    from exo.worker.gpu_telemetry import GPUTelemetryCollector, TelemetryConfig

    config = TelemetryConfig(interval_s=interval_s)
    events: list[Event] = []

    async def emit(event: Event) -> None:
        events.append(event)

    collector = GPUTelemetryCollector(NODE, backend, emit, config)
    cpu_start = time.process_time()
    await collector.start_monitoring()
    await anyio.sleep(duration_s)
    await collector.stop_monitoring()
    cpu_used = time.process_time() - cpu_start
    rss_after = process.memory_info().rss
    if simulate_file is not None:
        simulate_file.unlink(missing_ok=True)
        simulate_file.parent.rmdir()

    overhead_percent = max(0.0, cpu_used / duration_s - idle_cpu_rate) * 100
    # The first pass always emits (one event for all devices); count the steady state after.
    state_events = [
        event
        for event in events
        if isinstance(event, DeviceGPUStateUpdated | DeviceGPUStatesUpdated)
    ]
    steady_events = max(0, len(state_events) - 1)
    events_per_minute = steady_events * 60 / duration_s
    heartbeat_bound = 60 / config.heartbeat_s  # one event per pass, devices heartbeat together
    steady_bytes = sum(len(event.model_dump_json()) for event in state_events[1:])
    added_rss_mb = (rss_after - rss_before) / MB

    print(f"  (collector ran {duration_s:g} s at a {interval_s:g} s interval)")
    row(
        "backend init (create_backend)",
        f"{init_s * 1000:.1f} ms",
        "< 3 s",
        "< 0.3 s",
        verdict(init_s, 3.0, 0.3),
    )
    for info, wall, cpu in zip(devices, wall_per_sample, cpu_per_sample, strict=True):
        row(
            f"one sample of {info.device_id} (wall / CPU)",
            f"{wall * 1e6:.0f} / {cpu * 1e6:.0f} us",
            "-",
            "-",
            "",
        )
    row(
        "collector CPU, % of one core",
        f"{overhead_percent:.3f} %",
        "< 5 %",
        "< 0.5 %",
        verdict(overhead_percent, 5.0, 0.5),
    )
    print(
        f"  {'':<38} (idle loop baseline {idle_cpu_rate * 100:.3f} %, "
        f"run {cpu_used * 1000:.1f} ms CPU)"
    )
    row(
        "state events per minute (idle node)",
        f"{events_per_minute:.1f}",
        f"~{heartbeat_bound:g}",
        f"{heartbeat_bound:g}",
        f"{events_per_minute / heartbeat_bound:.2f} x heartbeat bound",
    )
    row(
        "state event bytes per minute (JSON)",
        f"{steady_bytes * 60 / duration_s:.0f}",
        "-",
        "-",
        f"{steady_bytes / max(steady_events, 1):.0f} bytes per event",
    )
    row(
        "RSS added by telemetry",
        f"{added_rss_mb:.1f} MB",
        "< 50 MB",
        "< 10 MB",
        verdict(added_rss_mb, 50.0, 10.0),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="GPU telemetry cost benchmark")
    parser.add_argument(
        "--backend",
        default="all",
        choices=["all", "auto", "cpu", "cuda", "metal", "simulated"],
        help="'all' runs auto and simulated, each in its own process",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=21.0,
        help="collector window, s (21 s holds two 10 s heartbeats of an idle device)",
    )
    parser.add_argument("--interval", type=float, default=2.0, help="sampling interval, s")
    parser.add_argument("--samples", type=int, default=200, help="readings per device timed")
    arguments = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")

    if arguments.backend != "all":
        anyio.run(
            measure, arguments.backend, arguments.duration, arguments.interval, arguments.samples
        )
        return
    print(f"python {sys.version.split()[0]}, {psutil.cpu_count()} CPUs")
    for backend_name in ("auto", "simulated"):
        command = [
            sys.executable,
            __file__,
            "--backend",
            backend_name,
            "--duration",
            str(arguments.duration),
            "--interval",
            str(arguments.interval),
            "--samples",
            str(arguments.samples),
        ]
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
