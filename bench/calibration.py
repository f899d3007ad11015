"""Prediction against reality: the bundled model on 1, 2 and 3 local ranks, the cost
model's ms/token before and after calibration against what the runners measure.

For each world size a cluster of that many nodes on 127.0.0.1 places the bundled model
over all of them (``min_nodes``) and serves streamed requests through the API:

* **before**: the decision's ``predicted_ms_per_token`` (nothing measured yet; the CPU
  backend's profile from docs/placement.md);
* **measured**: rank 0's end-to-end decode ms per generated token
  (``Instance.measured_ms_per_token``, from the ``StageTimeMeasured`` events), and the
  client's own count from the stream as a cross-check;
* **after**: the instance's layout predicted again with the calibration the measurements
  left in the state (``predict_instance``), against the next request's measurement.

Goal: within 15 % after calibration. All ranks share this machine's two cores.

    uv run python bench/calibration.py [--max-tokens 32] [--sizes 1,2,3]
"""

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import StreamTiming, timed
from exo.master.placement import predict_instance
from exo.models.cards import get_model_card
from exo.shared.types.ids import InstanceId
from exo.shared.types.state import State
from tests.cluster import ExoNode, converged, running_cluster, wait_until

MODEL = "SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "Write a short story about a dragon who learns to fly."}]
GOAL = 0.15


def stream(node: ExoNode, max_tokens: int) -> StreamTiming:
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
    }

    def frames() -> Iterator[int]:
        with httpx.stream(
            "POST", node.url + "/v1/chat/completions", json=body, timeout=300.0
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    frame = json.loads(line[len("data: ") :])
                    if frame.get("usage"):
                        continue
                    yield 1 if frame["choices"][0]["delta"].get("content") else 0

    return timed(frames())


def instance_json(node: ExoNode, instance_id: str) -> dict[str, Any]:
    return node.state()["instances"][instance_id]


def next_measurement(node: ExoNode, instance_id: str, after: str | None, max_tokens: int) -> float:
    """Serve one request and wait for rank 0's measurement of it (runners report at most
    every 5 s, so the request waits out that interval first)."""
    stream(node, max_tokens)

    def measured() -> bool:
        return instance_json(node, instance_id).get("measured_at") not in (None, after)

    wait_until(measured, 30.0, "the runners' measurement to reach the state")
    return float(instance_json(node, instance_id)["measured_ms_per_token"])


def one_size(world_size: int, max_tokens: int) -> dict[str, float]:
    card = get_model_card(MODEL)
    assert card is not None, f"{MODEL} has no card here"
    with (
        tempfile.TemporaryDirectory() as directory,
        running_cluster(Path(directory), world_size) as nodes,
    ):
        wait_until(lambda: converged(nodes, world_size), 15.0, "the cluster to converge")
        created = httpx.post(
            nodes[0].url + "/instance",
            json={"model_id": MODEL, "min_nodes": world_size},
            timeout=60.0,
        )
        assert created.status_code == 201, created.text
        instance = created.json()
        instance_id = instance["instance_id"]
        before = float(instance["placement"]["predicted_ms_per_token"])

        def ready() -> bool:
            runners = nodes[0].state()["runners"]
            return all(
                runners.get(shard["runner_id"], {}).get("status") == "ready"
                for shard in instance["shards"]
            )

        wait_until(ready, 180.0, "runners to be ready")
        first = next_measurement(nodes[0], instance_id, None, max_tokens)
        time.sleep(5.5)  # the runners' report interval
        state = State.model_validate(nodes[0].state())
        after = predict_instance(state.instances[InstanceId(instance_id)], state, card)
        assert after is not None
        at = instance_json(nodes[0], instance_id)["measured_at"]
        timing = stream(nodes[0], max_tokens)
        wait_until(
            lambda: instance_json(nodes[0], instance_id).get("measured_at") != at,
            30.0,
            "the second measurement",
        )
        second = float(instance_json(nodes[0], instance_id)["measured_ms_per_token"])
        client_ms = 1000.0 / timing.tokens_per_s if timing.tokens_per_s else 0.0
        factors = {
            f"{node}/{device}": calibration["factor"]
            for node, devices in nodes[0].state()["device_calibration"].items()
            for device, calibration in devices.items()
        }
        print(f"  {world_size} rank(s): calibration factors {factors}")
        return {
            "before": before,
            "first": first,
            "after": after,
            "second": second,
            "client": client_ms,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description="prediction against reality")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--sizes", default="1,2,3")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    rows = {size: one_size(size, args.max_tokens) for size in sizes}
    print(f"\n{MODEL}, {args.max_tokens} new tokens, ms per generated token (decode)")
    print(
        f"{'ranks':<6} {'predicted':>10} {'measured':>9} {'error':>7}   "
        f"{'calibrated':>10} {'measured':>9} {'error':>7} {'client':>7}"
    )
    worst = 0.0
    for size, row in rows.items():
        error_before = row["before"] / row["first"] - 1
        error_after = row["after"] / row["second"] - 1
        worst = max(worst, abs(error_after))
        print(
            f"{size:<6} {row['before']:10.1f} {row['first']:9.1f} {error_before:+7.0%}   "
            f"{row['after']:10.1f} {row['second']:9.1f} {error_after:+7.0%} {row['client']:7.1f}"
        )
    verdict = "PASS" if worst <= GOAL else "MISS"
    print(f"{verdict}  after calibration within {GOAL:.0%}: worst {worst:.1%}")


if __name__ == "__main__":
    main()
