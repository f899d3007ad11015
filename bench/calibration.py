"""Prediction against reality: the bundled model on 1, 2 and 3 local ranks, the cost
model's ms/token before and after calibration against what the runners measure.

For each world size a cluster of that many nodes on 127.0.0.1 places the bundled model
over all of them (``min_nodes``) and serves streamed requests through the API:

* **before**: the decision's ``predicted_ms_per_token`` (nothing measured yet; the CPU
  backend's profile from docs/placement.md), against the median of the next
  ``--requests`` measurements: rank 0's end-to-end decode ms per generated token
  (``Instance.measured_ms_per_token``, from the ``StageTimeMeasured`` events), after one
  warm-up request the runners do not report;
* **after**: the instance's layout predicted again with the calibration those
  measurements left in the state (``predict_instance``), against the median of the
  ``--requests`` measurements that follow.

Goal: within 15 % after calibration. All ranks share this machine's two cores.

    uv run python bench/calibration.py [--max-tokens 32] [--requests 3] [--sizes 1,2,3]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.inference import MODEL
from bench.inference import stream_over_api as stream
from exo.master.placement import predict_instance
from exo.models.cards import get_model_card
from exo.shared.types.ids import InstanceId
from exo.shared.types.state import State
from exo.worker.runner.timing import REPORT_INTERVAL_S
from tests.cluster import ExoNode, converged, running_cluster, wait_until

GOAL = 0.15


def instance_json(node: ExoNode, instance_id: str) -> dict[str, Any]:
    return node.state()["instances"][instance_id]


def measured_requests(node: ExoNode, instance_id: str, count: int, max_tokens: int) -> list[float]:
    """Serve ``count`` requests, each waiting out the runners' report interval, and return
    rank 0's measurement of each (ms per decode token) as it reached the state."""
    values: list[float] = []
    for _ in range(count):
        at = instance_json(node, instance_id).get("measured_at")
        time.sleep(REPORT_INTERVAL_S + 0.5)
        stream(node, max_tokens)
        wait_until(
            lambda at=at: instance_json(node, instance_id).get("measured_at") not in (None, at),
            30.0,
            "the runners' measurement to reach the state",
        )
        values.append(float(instance_json(node, instance_id)["measured_ms_per_token"]))
    return values


def one_size(world_size: int, max_tokens: int, requests: int) -> dict[str, float]:
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
        stream(nodes[0], 8)  # warms MLX up; runners do not report it
        learning = measured_requests(nodes[0], instance_id, requests, max_tokens)
        state = State.model_validate(nodes[0].state())
        after = predict_instance(state.instances[InstanceId(instance_id)], state, card)
        assert after is not None
        checking = measured_requests(nodes[0], instance_id, requests, max_tokens)
        factors = [
            f"{calibration['factor']:.2f}"
            for devices in state.model_dump(mode="json")["device_calibration"].values()
            for calibration in devices.values()
        ]
        print(f"  {world_size} rank(s): calibration factors {', '.join(factors)}")
        return {
            "before": before,
            "learning": statistics.median(learning),
            "after": after,
            "checking": statistics.median(checking),
            "spread": max(checking) / min(checking) - 1,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description="prediction against reality")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=3, help="measured requests per phase")
    parser.add_argument("--sizes", default="1,2,3")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    rows = {size: one_size(size, args.max_tokens, args.requests) for size in sizes}
    print(
        f"\n{MODEL}, {args.max_tokens} new tokens, ms per generated token (decode), median of "
        f"{args.requests} requests per phase"
    )
    print(
        f"{'ranks':<6} {'predicted':>10} {'measured':>9} {'error':>7}   "
        f"{'calibrated':>10} {'measured':>9} {'error':>7} {'spread':>7}"
    )
    worst = 0.0
    for size, row in rows.items():
        error_before = row["before"] / row["learning"] - 1
        error_after = row["after"] / row["checking"] - 1
        worst = max(worst, abs(error_after))
        print(
            f"{size:<6} {row['before']:10.1f} {row['learning']:9.1f} {error_before:+7.0%}   "
            f"{row['after']:10.1f} {row['checking']:9.1f} {error_after:+7.0%} "
            f"{row['spread']:7.0%}"
        )
    print("spread: the slowest of the checking requests over the fastest")
    verdict = "PASS" if worst <= GOAL else "MISS"
    print(f"{verdict}  after calibration within {GOAL:.0%}: worst {worst:.1%}")


if __name__ == "__main__":
    main()
