"""Telemetry sample -> applied on every node, across 3 real nodes on loopback.

Each node runs the simulated backend at a 0.2 s interval on a device file that this script
rewrites every 0.25 s (memory use moves by 5 % each time, so every pass has news). For each
reading (in a ``DeviceGPUStateUpdated``, or in full in a ``DeviceGPUStatesUpdated``) the
latency is the time from the reading (``last_update``, taken when the sample was made) to the
moment the last of the 3 nodes applied its event; a heartbeat by id counts from the pass's
``sampled_at``.

    uv run python bench/telemetry_cluster.py [--seconds 20]
"""

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import percentile
from tests.cluster import converged, running_cluster, wait_until
from tests.simulated import GB, device, write_devices

SEED_TARGET_MS = 500.0
GOAL_P99_MS = 100.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        base = Path(directory)
        files = [
            write_devices(base / f"gpus{index}.json", [device("cuda:0", "Sim GPU", 24, 1000)])
            for index in range(3)
        ]

        def node_args(index: int) -> list[str]:
            return ["--simulate-gpus", str(files[index]), "--telemetry-interval", "0.2"]

        with running_cluster(base / "cluster", 3, node_args) as nodes:
            wait_until(lambda: converged(nodes, 3), 15.0, "the cluster to converge")
            time.sleep(2.0)  # start-up readings, emitted before a master existed, are not counted
            measuring_since = time.time()
            started = time.monotonic()
            step = 0
            while time.monotonic() - started < args.seconds:
                step += 1
                used = (step % 10) * 0.05 * 24
                for path in files:
                    write_devices(
                        path,
                        [device("cuda:0", "Sim GPU", 24, 1000, memory_used_bytes=int(used * GB))],
                    )
                time.sleep(0.25)
            time.sleep(1.0)
            logs = [node.all_events() for node in nodes]
    applied: dict[str, float] = {}
    sampled: dict[tuple[str, str], float] = {}  # (event id, device id) -> when read
    for log in logs:
        for entry in log:
            event = entry["event"]
            event_id = event["event_id"]
            if event["kind"] == "DeviceGPUStateUpdated":
                readings = [event["device_state"]]
                unchanged: list[str] = []
            elif event["kind"] == "DeviceGPUStatesUpdated":
                readings = event["device_states"]
                unchanged = event["unchanged_device_ids"]
            else:
                continue
            applied[event_id] = max(applied.get(event_id, 0.0), entry["applied_at"])
            for reading in readings:
                when = datetime.fromisoformat(reading["last_update"]).timestamp()
                sampled[(event_id, reading["device_id"])] = when
            for device_id in unchanged:
                when = datetime.fromisoformat(event["sampled_at"]).timestamp()
                sampled[(event_id, device_id)] = when
    on_every_node = set.intersection(*({e["event"]["event_id"] for e in log} for log in logs))
    counted = [
        k for k, when in sampled.items() if k[0] in on_every_node and when >= measuring_since
    ]
    latencies = [(applied[key[0]] - sampled[key]) * 1000 for key in counted]
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    print(
        f"{len(latencies)} device readings sampled after the cluster settled, all applied on 3 nodes"
    )
    print(
        f"sample -> applied everywhere: p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {max(latencies):.1f} ms, mean {statistics.mean(latencies):.1f} ms"
    )
    print(
        f"seed target < {SEED_TARGET_MS:.0f} ms: p99/target = {p99 / SEED_TARGET_MS:.3f} {'OK' if p99 < SEED_TARGET_MS else 'MISSED'}"
    )
    print(
        f"goal p99 < {GOAL_P99_MS:.0f} ms: p99/goal = {p99 / GOAL_P99_MS:.3f} {'OK' if p99 < GOAL_P99_MS else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
