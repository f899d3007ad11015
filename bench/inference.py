"""Inference through the whole stack: single node vs 2- and 3-node pipelines on loopback.

For each layout, real exo nodes place SmolLM2-135M-Instruct (min_nodes = N), then streamed
chat requests at temperature 0 measure time to first token and decode tokens/s; every
runner's peak RSS (VmHWM) is read and set against its share of the layers. Ratios are
against the single node of the same run. All ranks share this machine's cores, so the
pipelines show their overhead, not a speed-up.

    uv run python bench/inference.py [--requests 3] [--max-tokens 48]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.cluster import ExoNode, converged, running_cluster, wait_until

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "Write one sentence about the sea."


def stream_once(node: ExoNode, max_tokens: int) -> tuple[float, float, int]:
    """(seconds to first token, decode tokens/s after it, completion tokens)."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
    }
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    with httpx.stream(
        "POST", node.url + "/v1/chat/completions", json=body, timeout=300.0
    ) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            frame = json.loads(line[len("data: ") :])
            choice = frame["choices"][0]
            if choice["delta"].get("content") and first is None:
                first = time.perf_counter()
            if frame.get("usage"):
                tokens = frame["usage"]["completion_tokens"]
    finished = time.perf_counter()
    assert first is not None and tokens > 1
    return first - started, (tokens - 1) / max(finished - first, 1e-9), tokens


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return psutil.Process(pid).memory_info().rss


def runner_peaks(nodes: list[ExoNode]) -> dict[str, int]:
    """runner rank layer range -> peak RSS, found from the node processes' children."""
    peaks: dict[str, int] = {}
    for node in nodes:
        assert node.process is not None
        for child in psutil.Process(node.process.pid).children(recursive=True):
            command = child.cmdline()
            if "exo.worker.runner.process" not in " ".join(command):
                continue
            rank = command[command.index("--rank") + 1]
            start = command[command.index("--layer-start") + 1]
            end = command[command.index("--layer-end") + 1]
            peaks[f"rank {rank} layers {start}-{end}"] = peak_rss_bytes(child.pid)
    return peaks


def measure(directory: Path, world_size: int, requests: int, max_tokens: int) -> dict[str, Any]:
    with running_cluster(directory, world_size) as nodes:
        wait_until(lambda: converged(nodes, world_size), 15.0, "the cluster to converge")
        created = httpx.post(
            nodes[0].url + "/instance",
            json={"model_id": MODEL, "min_nodes": world_size},
            timeout=30.0,
        )
        assert created.status_code == 201, created.text
        shards = created.json()["shards"]

        def ready() -> bool:
            runners = nodes[0].state()["runners"]
            return all(runners.get(s["runner_id"], {}).get("status") == "ready" for s in shards)

        load_s = wait_until(ready, 180.0, "runners to be ready")
        stream_once(nodes[0], 8)  # warm-up
        results = [stream_once(nodes[0], max_tokens) for _ in range(requests)]
        return {
            "load_s": load_s,
            "ttft_s": statistics.median(r[0] for r in results),
            "tokens_per_s": statistics.median(r[1] for r in results),
            "peaks": runner_peaks(nodes),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    rows: dict[int, dict[str, Any]] = {}
    for world_size in (1, 2, 3):
        with tempfile.TemporaryDirectory() as directory:
            rows[world_size] = measure(Path(directory), world_size, args.requests, args.max_tokens)
    base = rows[1]
    print(f"{'layout':<10} {'load s':>7} {'TTFT ms':>9} {'tok/s':>7} {'TTFT x':>7} {'tok/s x':>8}")
    for world_size, row in rows.items():
        print(
            f"{world_size}-node{'':<4} {row['load_s']:7.1f} {row['ttft_s'] * 1000:9.0f} "
            f"{row['tokens_per_s']:7.2f} {row['ttft_s'] / base['ttft_s']:7.2f} "
            f"{row['tokens_per_s'] / base['tokens_per_s']:8.2f}"
        )
    print("\npeak RSS per runner (VmHWM):")
    for world_size, row in rows.items():
        for name, peak in sorted(row["peaks"].items()):
            print(f"  {world_size}-node {name:<22} {peak / 2**20:7.1f} MiB")


if __name__ == "__main__":
    main()
