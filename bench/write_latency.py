"""What an acknowledged write costs: ``POST /instance`` through a non-master node of a
3-node loopback cluster is answered only once a majority stored its events. Baseline from
the same run: ``GET /state`` on the same node (an HTTP round trip that touches no log).

Writes place a planning-only model on large simulated GPUs (no runner process starts).

    uv run python bench/write_latency.py [--writes 100]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import percentile
from tests.writes import MODEL, writable_cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--writes", type=int, default=100)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as directory,
        writable_cluster(Path(directory), 3) as nodes,
    ):
        master_id = nodes[0].state()["master_node_id"]
        node = next(node for node in nodes if node.node_id() != master_id)
        writes: list[float] = []
        reads: list[float] = []
        with httpx.Client(timeout=20.0) as client:
            for _ in range(args.writes):
                started = time.perf_counter()
                response = client.post(
                    node.url + "/instance", json={"model_id": MODEL, "allow_planning_only": True}
                )
                writes.append((time.perf_counter() - started) * 1000)
                assert response.status_code == 201, response.text
                started = time.perf_counter()
                client.get(node.url + "/state").raise_for_status()
                reads.append((time.perf_counter() - started) * 1000)
    for name, values in (("POST /instance (committed)", writes), ("GET /state", reads)):
        print(
            f"{name}: p50 {statistics.median(values):.1f} ms, p99 {percentile(values, 0.99):.1f} ms"
        )
    print(f"ratio of medians: {statistics.median(writes) / statistics.median(reads):.1f}x")


if __name__ == "__main__":
    main()
